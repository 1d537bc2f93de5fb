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
import re
from collections import defaultdict
from pathlib import Path

from llava_sft.eval import metrics as M
from llava_sft.eval import score_choice, score_vqa
from llava_sft.eval.score_common import print_table, read_json, read_jsonl, write_json


# ============================================================================ POPE
def pope_label_files(annotations: Path) -> dict[str, Path]:
    """{category: label file} from a folder of `<source>_pope_<category>.json` (or given files)."""
    files = sorted(annotations.glob("*_pope_*.json")) if annotations.is_dir() else [annotations]
    found = {}
    for f in files:
        match = re.fullmatch(r".*_pope_(.+)\.json", f.name)
        if match is None:
            raise ValueError(f"{f}: not a POPE label file (<source>_pope_<category>.json)")
        found[match.group(1)] = f
    if not found:
        raise ValueError(f"no *_pope_*.json label files in {annotations}")
    return found


def score_pope(answers: Path, questions: Path, annotations: Path) -> dict:
    rows = read_jsonl(answers)
    category = {q["question_id"]: q["category"] for q in read_jsonl(questions)}
    labels = {c: [r["label"] for r in read_jsonl(f)] for c, f in pope_label_files(Path(annotations)).items()}
    result = M.pope_scores(rows, category, labels)
    return {"benchmark": "pope", "headline": result["mean_f1_x100"], "headline_metric": "mean F1 x100 over splits",
            **result}


def _table_pope(r: dict) -> None:
    keys = ("n", "TP", "FP", "TN", "FN", "accuracy", "precision", "recall", "f1", "yes_ratio")
    print_table("POPE", ("split",) + keys, [[c] + [s[k] for k in keys] for c, s in r["splits"].items()])
    print(f"POPE (mean F1 x100): {r['mean_f1_x100']:.2f}")


# ============================================================================ ScienceQA
def score_scienceqa(answers: Path, annotations: Path, split: str = "test") -> dict:
    base = Path(annotations)
    problems = read_json(base / "problems.json")
    split_ids = read_json(base / "pid_splits.json")[split]
    predictions = {str(p["question_id"]): p for p in read_jsonl(answers)}
    result = M.scienceqa_scores(problems, split_ids, predictions)
    return {"benchmark": "scienceqa", "headline": result["img_acc"], "headline_metric": "IMG accuracy (%)",
            "split": split, **result}


def _table_scienceqa(r: dict) -> None:
    print_table("ScienceQA", ("subset", "n", "correct", "accuracy %"),
                [("all", r["total"], r["correct"], r["acc"]), ("IMG", r["img_total"], r["img_correct"], r["img_acc"])])
    print(f"parse failures: {r['parsed_FAILED']}, missing predictions: {r['missing']}")


# ============================================================================ MME
def _lines(path: Path) -> list[str]:
    """Lines as Python's readlines() splits them (on newlines only), without the line ends."""
    text = Path(path).read_text(encoding="utf-8")
    return (text[:-1] if text.endswith("\n") else text).split("\n") if text else []


def mme_ground_truth(annotations: Path) -> dict[tuple[str, str, str], str]:
    """{(task, "<stem>.txt", question): "Yes"/"No"} from eval_tool's Your_Results/<task>.txt files
    (image, question, answer) or from the MME_Benchmark_release_version tree (convert_answer_to_mme)."""
    root = Path(annotations)
    gt = {}
    flat = [root / f"{t}.txt" for kind in M.MME_TASKS.values() for t in kind if (root / f"{t}.txt").is_file()]
    if flat:
        for f in flat:
            for line in _lines(f):
                if line.strip():
                    image, question, answer = line.strip().split("\t")
                    gt[(f.stem, image.split(".")[0] + ".txt", question)] = answer
        return gt
    for task_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        qa_dir = task_dir / "questions_answers_YN" if (task_dir / "images").exists() else task_dir
        for f in sorted(qa_dir.glob("*.txt")):
            for line in _lines(f):
                if line.strip():
                    question, answer = line.strip().split("\t")
                    gt[(task_dir.name, f.name, question)] = answer
    if not gt:
        raise ValueError(f"no MME ground truth found under {root}")
    return gt


def mme_rows_from_answers(answers: Path, annotations: Path) -> dict[str, list[tuple]]:
    """convert_answer_to_mme: per task, (stem file, question, gt, prediction) in answer-file order."""
    gt = mme_ground_truth(annotations)
    rows = defaultdict(list)
    for a in read_jsonl(answers):
        key = M.mme_question_key(a["question_id"], a["prompt"], gt)
        if key not in gt:
            raise ValueError(f"MME answer {a['question_id']!r} / {key[2]!r} has no ground truth")
        rows[key[0]].append((key[1], key[2], gt[key], a["text"]))
    return rows


def mme_rows_from_eval_tool(results_dir: Path) -> dict[str, list[tuple]]:
    """calculation.py's input: <task>.txt lines `file\\tquestion\\tgt\\tprediction`."""
    rows = {}
    for kind in M.MME_TASKS.values():
        for task in kind:
            f = Path(results_dir) / f"{task}.txt"
            if f.is_file():
                rows[task] = []
                for number, line in enumerate(_lines(f), 1):
                    fields = tuple(line.split("\t"))
                    if len(fields) != 4:
                        raise ValueError(f"{f}:{number}: expected file, question, gt, prediction")
                    rows[task].append(fields)
    if not rows:
        raise ValueError(f"no MME <task>.txt result files in {results_dir}")
    return rows


def score_mme(answers: Path, annotations: Path | None = None, submission: Path | None = None) -> dict:
    if Path(answers).is_dir():
        rows = mme_rows_from_eval_tool(answers)
    elif annotations is None:
        raise ValueError("mme: --annotations (the MME ground truth) is needed with an answer file")
    else:
        rows = mme_rows_from_answers(answers, annotations)
    if submission is not None:
        out = Path(submission)
        out.mkdir(parents=True, exist_ok=True)
        for task, task_rows in rows.items():
            (out / f"{task}.txt").write_text("".join("\t".join(r) + "\n" for r in task_rows), encoding="utf-8")
    result = M.mme_scores({t: [(r[2], r[3]) for r in task_rows] for t, task_rows in rows.items()})
    return {"benchmark": "mme", "headline": result["perception"], "headline_metric": "perception score", **result}


def _table_mme(r: dict) -> None:
    print_table("MME", ("subtask", "n", "acc", "acc+", "score", "other"),
                [(t, s["n"], s["acc"], s["acc_plus"], s["score"], s["other"]) for t, s in r["per_subtask"].items()])
    print(f"Perception: {r['perception']:.4f}   Cognition: {r['cognition']:.4f}")
    if r["missing_subtasks"]:
        print(f"WARNING: missing subtasks (not in the totals): {', '.join(r['missing_subtasks'])}")


# ============================================================================ LLaVA-Bench
def review_run_name(path: Path) -> str:
    return Path(path).name.replace("gpt4_text_", "").replace(".jsonl", "")


def score_llava_bench(review_files: list[Path], ignore: list[int] | None = None) -> dict:
    runs = {review_run_name(f): M.llava_bench_summary(read_jsonl(f), ignore or ()) for f in review_files}
    mean = M.llava_bench_mean_over_runs(list(runs.values()))
    return {"benchmark": "llava_bench", "headline": mean.get("all"),
            "headline_metric": f"relative score 'all', mean over {len(runs)} review run(s)",
            "runs": runs, "mean_over_runs": mean}


def _table_llava_bench(r: dict) -> None:
    rows = [(run, g, s["relative"], s["ref_x10"], s["model_x10"]) for run, summary in r["runs"].items()
            for g, s in summary.items()]
    print_table("LLaVA-Bench (In-the-Wild)", ("run", "category", "relative", "ref x10", "model x10"), rows)
    print("mean over runs: " + ", ".join(f"{g} {v:.2f}" for g, v in r["mean_over_runs"].items()))


# ============================================================================ MM-Vet
def mm_vet_results_from_answers(answers: Path) -> dict[str, str]:
    """convert_mmvet_for_eval: {"v1_<question_id>": text}, the evaluator's --result_file."""
    return {f"v1_{a['question_id']}": a["text"] for a in read_jsonl(answers)}


def score_mm_vet(grades: Path | None, metadata: Path | None = None, num_run: int | None = None,
                 n_questions: int | None = None, decimal_places: int = 1, model_answers: Path | None = None,
                 submission: Path | None = None) -> dict:
    out = {"benchmark": "mm_vet"}
    if model_answers is not None:
        if submission is None:
            raise ValueError("mm_vet: --model-answers needs --submission (where to write the results JSON)")
        write_json(submission, mm_vet_results_from_answers(model_answers))
        out["submission"] = str(submission)
    if grades is not None:
        result = M.mm_vet_scores(read_json(grades), num_run, n_questions, decimal_places,
                                 read_json(metadata) if metadata else None)
        out.update({"headline": result["total"], "headline_metric": "total, mean over grading runs", **result})
    return out


def _table_mm_vet(r: dict) -> None:
    if "total" not in r:
        print(f"MM-Vet results file written to {r['submission']}")
        return
    dp = r["decimal_places"]
    rows = [(f"run {i + 1}", v, r["runs_rounded"][i]) for i, v in enumerate(r["runs"])]
    rows += [("total", r["total"], r["total_rounded"]), ("std", r["std"], r["std_rounded"])]
    rows += [(c, None, v) for c, v in r.get("capabilities", {}).items()]
    print_table("MM-Vet", ("", "value", f"{dp} dp"), rows)


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


def _configure_core(sub) -> dict:
    p = sub.add_parser("pope", help="POPE (eval_pope.py)")
    _add_common(p, "LLaVA answer file (JSONL)", "folder of coco_pope_<split>.json label files", True)
    p.add_argument("--questions", type=Path, required=True, help="llava_pope_test.jsonl (gives each answer's split)")
    p = sub.add_parser("scienceqa", help="ScienceQA-IMG (eval_science_qa.py)")
    _add_common(p, "LLaVA answer file (JSONL)", "folder with problems.json and pid_splits.json", True)
    p.add_argument("--split", default="test")
    p = sub.add_parser("mme", help="MME (convert_answer_to_mme.py + calculation.py)")
    _add_common(p, "LLaVA answer file (JSONL), or an eval_tool answers folder of <task>.txt files",
                "MME ground truth: eval_tool Your_Results/ (<task>.txt) or MME_Benchmark_release_version/")
    p.add_argument("--submission", type=Path, help="write the eval_tool answer files (<task>.txt) to this folder")
    p = sub.add_parser("llava_bench", help="LLaVA-Bench In-the-Wild (summarize_gpt_review.py)")
    _add_common(p, "GPT-4 review file(s), one per judge run (JSONL)", None, several=True)
    p.add_argument("--ignore", type=int, nargs="*", default=None, help="question ids to leave out")
    p = sub.add_parser("mm_vet", help="MM-Vet (mm-vet_evaluator.py export_result on a grade file)")
    p.add_argument("--answers", type=Path, default=None, help="GPT-4 grade file MODEL_gpt-4-grade-Nruns.json")
    p.add_argument("--annotations", type=Path, default=None, help="mm-vet.json (per-capability scores)")
    p.add_argument("--num-run", type=int, default=None, help="runs to score (default: all in the grade file)")
    p.add_argument("--n-questions", type=int, default=None, help="denominator (default: len(mm-vet.json) or graded)")
    p.add_argument("--decimal-places", type=int, default=1)
    p.add_argument("--model-answers", type=Path, default=None, help="LLaVA answer JSONL to convert for the evaluator")
    p.add_argument("--submission", type=Path, default=None, help="where to write the converted results JSON")
    p.add_argument("--out", type=Path, default=None, help="write the result JSON here")
    p = sub.add_parser("shapes", help="the embedded demo's shapes questions (llava_sft.eval.shapes)")
    _add_common(p, "LLaVA answer file (JSONL)", "eval/answers.jsonl written by data_prep.make_shapes", True)
    return {
        "shapes": (lambda a: score_shapes_file(a.answers, a.annotations), _table_shapes),
        "pope": (lambda a: score_pope(a.answers, a.questions, a.annotations), _table_pope),
        "scienceqa": (lambda a: score_scienceqa(a.answers, a.annotations, a.split), _table_scienceqa),
        "mme": (lambda a: score_mme(a.answers, a.annotations, a.submission), _table_mme),
        "llava_bench": (lambda a: score_llava_bench(a.answers, a.ignore), _table_llava_bench),
        "mm_vet": (lambda a: score_mm_vet(a.answers, a.annotations, a.num_run, a.n_questions, a.decimal_places,
                                          a.model_answers, a.submission), _table_mm_vet),
    }


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    ap = argparse.ArgumentParser(prog="python -m llava_sft.eval.score", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    commands = _configure_core(sub)
    commands.update(score_vqa.configure(sub, _add_common))
    commands.update(score_choice.configure(sub, _add_common))
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
