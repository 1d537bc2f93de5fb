"""Score LLaVA answer files on the LLaVA-1.5 benchmarks with the reference protocols (see metrics.py).

    python -m llava_sft.eval.score BENCHMARK --answers ... [--annotations ...] [--out RESULT.json]
    python -m llava_sft.eval.score BENCHMARK --help      # the inputs of one benchmark

Input files are those of LLaVA's eval.zip (playground/data/eval/...) and the official annotations:

  pope         --answers answers.jsonl --questions llava_pope_test.jsonl --annotations coco/ (coco_pope_*.json)
  scienceqa    --answers answers.jsonl --annotations DIR (problems.json + pid_splits.json) [--split test]
  mme          --answers answers.jsonl --annotations GT (eval_tool Your_Results/ or MME_Benchmark_release_version/)
               [--submission DIR: the eval_tool answer files]   |   --answers eval_tool/answers/MODEL/ (no GT)
  llava_bench  --answers reviews-eval1.jsonl [reviews-eval2.jsonl ...]   (GPT-4 review files; mean over runs)
  mm_vet       --answers MODEL_gpt-4-grade-Nruns.json [--annotations mm-vet.json] [--decimal-places 1]
               [--model-answers answers.jsonl --submission results.json: the file the MM-Vet evaluator reads]
  vqav2        --answers answers.jsonl [--annotations v2_mscoco_val2014_annotations.json] [--questions Q.jsonl]
               [--submission upload.json]
  vizwiz       --answers answers.jsonl --questions llava_vizwiz_*.jsonl [--annotations val.json] [--submission upload.json]
  textvqa      --answers answers.jsonl --annotations TextVQA_0.5.1_val.json
  gqa          --answers answers.jsonl [--annotations testdev_balanced_questions.json] [--submission predictions.json]
  mmbench      --answers answers.jsonl [--annotations mmbench_dev.tsv] [--submission predictions.tsv|.json]
  seed         --answers answers.jsonl --annotations SEED-Bench.json [--submission upload.jsonl]

Every scorer prints a small table and, with --out, writes a JSON whose `headline` is the paper's number
on the paper's scale (what `python -m llava_sft.eval.report` tabulates); submission-only runs have none.
"""
from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from llava_sft.eval.common import print_table, write_json
from llava_sft.eval.tasks import BENCHMARKS
from llava_sft.eval.tasks.llava_bench import score_llava_bench  # noqa: F401  (the scorers, by their old names)
from llava_sft.eval.tasks.mm_vet import score_mm_vet  # noqa: F401
from llava_sft.eval.tasks.mme import score_mme  # noqa: F401
from llava_sft.eval.tasks.pope import score_pope  # noqa: F401
from llava_sft.eval.tasks.scienceqa import score_scienceqa  # noqa: F401


# ============================================================================ the demo's shapes questions
def score_shapes_file(answers: Path, annotations: Path) -> dict:
    from llava_sft.eval.shapes import load_jsonl, score_shapes

    result = score_shapes({r["question_id"]: r["text"] for r in load_jsonl(answers)}, load_jsonl(annotations))
    return {**result, "headline": 100 * result["accuracy"], "headline_metric": "accuracy (%)"}


def _table_shapes(r: dict) -> None:
    rows = [(t, v["n"], round(100 * v["accuracy"], 2)) for t, v in r["by_type"].items()]
    print_table("shapes (demo)", ("type", "n", "accuracy"), rows + [("overall", r["n"], round(r["headline"], 2))])


# ============================================================================ CLI
def _add_common(p: argparse.ArgumentParser, answers_help: str, annotations_help: str | None,
                annotations_required: bool = False, several: bool = False) -> None:
    p.add_argument("--answers", type=Path, nargs="+" if several else None, required=True, help=answers_help)
    if annotations_help:
        p.add_argument("--annotations", type=Path, required=annotations_required, help=annotations_help)
    p.add_argument("--out", type=Path, default=None, help="write the result JSON here")


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    ap = argparse.ArgumentParser(prog="python -m llava_sft.eval.score", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    commands = {}
    for name in BENCHMARKS:  # each benchmark's module adds its own arguments (llava_sft/eval/tasks/)
        commands.update(importlib.import_module(f"llava_sft.eval.tasks.{name}").add_parser(sub, _add_common))
    p = sub.add_parser("shapes", help="the embedded demo's shapes questions (llava_sft.eval.shapes)")
    _add_common(p, "LLaVA answer file (JSONL)", "eval/answers.jsonl written by data_prep.make_shapes", True)
    commands["shapes"] = (lambda a: score_shapes_file(a.answers, a.annotations), _table_shapes)
    return ap, commands


def main(argv: list[str] | None = None) -> dict:
    ap, commands = build_parser()
    args = ap.parse_args(argv)
    if args.benchmark == "mm_vet" and args.answers is None and args.model_answers is None:
        ap.error("mm_vet: give --answers (a grade file) and/or --model-answers with --submission")
    run, table = commands[args.benchmark]
    try:
        result = run(args)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise SystemExit(f"{args.benchmark}: {e}") from e
    table(result)
    if result.get("headline") is not None:
        print(f"headline ({result['headline_metric']}): {result['headline']}")
    if args.out is not None:  # no local number (submission only): no headline key, so report.py says so
        write_json(args.out, {k: v for k, v in result.items() if not (k == "headline" and v is None)})
        print(f"written to {args.out}")
    return result


if __name__ == "__main__":
    main()
