"""MM-Vet: its metric, answer parsing and file I/O, as the reference computes them.

MM-Vet -- `mm_vet_scores`
  * yuweihao/MM-Vet@acde843e02dae30047bb456ee4a8ab28dee7e0ae mm-vet_evaluator.py `export_result` on a
    complete grade file: per run i, total_i = 100 * sum of score[i] over graded samples / number of
    questions (218); reported total = numpy round(mean of total_i, decimal_places) (default 1), std =
    round(population std of total_i), runs = rounded total_i. Per capability (given mm-vet.json): sum
    over samples having that capability / count of such samples; capability combinations are named
    by their sorted capabilities joined by "_" (the reference joins a Python set: hash-order dependent).

Sources and commits: llava_sft/eval/common.py.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Mapping

import numpy as np

from llava_sft.eval.common import (
    print_table,
    read_json,
    read_jsonl,
    write_json,
)


def mm_vet_scores(grades: Mapping[str, Mapping], num_run: int | None = None, n_questions: int | None = None,
                  decimal_places: int = 1, metadata: Mapping[str, Mapping] | None = None) -> dict:
    """MM-Vet export_result on a complete grade file {id: {"score": [per run]}}.

    Returns unrounded per-run totals, their mean and population std, the same rounded as the evaluator
    prints them, and, with `metadata` (mm-vet.json), per-capability and per-combination means."""
    runs = num_run if num_run is not None else min(len(v["score"]) for v in grades.values())
    if metadata is not None:
        n_questions = n_questions or len(metadata)
    n = n_questions or len(grades)
    sums = [0.0] * runs
    cap_sums, combo_sums = defaultdict(lambda: [0.0] * runs), defaultdict(lambda: [0.0] * runs)
    for key, value in grades.items():
        if len(value["score"]) < runs:
            raise ValueError(f"{key} has {len(value['score'])} grades, fewer than {runs} runs")
        for i in range(runs):
            sums[i] += value["score"][i]
            if metadata is not None:
                caps = set(metadata[key]["capability"])
                for c in caps:
                    cap_sums[c][i] += value["score"][i]
                combo_sums["_".join(sorted(caps))][i] += value["score"][i]
    totals = np.array(sums) / n * 100
    out = {"num_run": runs, "n_questions": n, "n_graded": len(grades), "runs": totals.tolist(),
           "total": float(totals.mean()), "std": float(totals.std()), "decimal_places": decimal_places,
           "runs_rounded": np.round(totals, decimal_places).tolist(),
           "total_rounded": float(np.round(totals.mean(), decimal_places)),
           "std_rounded": float(np.round(totals.std(), decimal_places))}
    if metadata is not None:
        cap_count, combo_count = defaultdict(int), defaultdict(int)
        for value in metadata.values():
            caps = set(value["capability"])
            for c in caps:
                cap_count[c] += 1
            combo_count["_".join(sorted(caps))] += 1
        out["capabilities"] = {c: float(np.round(np.mean(np.array(cap_sums[c]) / cap_count[c] * 100), decimal_places))
                               for c, _ in sorted(cap_count.items(), key=lambda kv: -kv[1])}
        out["capability_combinations"] = {
            c: float(np.round(np.mean(np.array(combo_sums[c]) / combo_count[c] * 100), decimal_places))
            for c, _ in sorted(combo_count.items(), key=lambda kv: -kv[1])}
    return out




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
        result = mm_vet_scores(read_json(grades), num_run, n_questions, decimal_places,
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


def add_parser(sub, add_common) -> dict:
    """The `python -m llava_sft.eval.score mm_vet` arguments; {benchmark: (run, print table)}."""
    p = sub.add_parser("mm_vet", help="MM-Vet (mm-vet_evaluator.py export_result on a grade file)")
    p.add_argument("--answers", type=Path, default=None, help="GPT-4 grade file MODEL_gpt-4-grade-Nruns.json")
    p.add_argument("--annotations", type=Path, default=None, help="mm-vet.json (per-capability scores)")
    p.add_argument("--num-run", type=int, default=None, help="runs to score (default: all in the grade file)")
    p.add_argument("--n-questions", type=int, default=None, help="denominator (default: len(mm-vet.json) or graded)")
    p.add_argument("--decimal-places", type=int, default=1)
    p.add_argument("--model-answers", type=Path, default=None, help="LLaVA answer JSONL to convert for the evaluator")
    p.add_argument("--submission", type=Path, default=None, help="where to write the converted results JSON")
    p.add_argument("--out", type=Path, default=None, help="write the result JSON here")
    return {
        "mm_vet": (lambda a: score_mm_vet(a.answers, a.annotations, a.num_run, a.n_questions, a.decimal_places,
                                          a.model_answers, a.submission), _table_mm_vet),
    }
