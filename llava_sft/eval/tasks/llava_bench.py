"""LLaVA-Bench (In-the-Wild): its metric, answer parsing and file I/O, as the reference computes them.

LLaVA-Bench (In-the-Wild) -- `llava_bench_parse_score`, `llava_bench_summary`, `llava_bench_mean_over_runs`
  * LLaVA llava/eval/eval_gpt_review_bench.py `parse_score`: first line of the review, ',' -> ' ',
    split on single spaces; exactly two parts -> two floats, otherwise (or on a float error) (-1, -1)
    (so "8, 9" -> "8  9" -> three parts -> (-1, -1)).
  * LLaVA llava/eval/summarize_gpt_review.py: tuples grouped by review category plus "all"
    (reviews without category: "tuple" or else "score" into "all" only), `-i` ignores question ids;
    per group numpy mean of [ref, model] over reviews, each rounded to 3 dp, relative =
    round(model / ref * 100, 1), printed with round(ref * 10, 1) and round(model * 10, 1). (-1, -1)
    tuples are *not* dropped. The paper number is the mean of the printed relative values over the
    3 GPT-4 review runs (not printed by the script).

Sources and commits: llava_sft/eval/common.py.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from llava_sft.eval.common import (
    print_table,
    read_jsonl,
)


def llava_bench_parse_score(review: str) -> tuple[float, float]:
    """eval_gpt_review_bench.parse_score: the two scores on the review's first line, else (-1, -1)."""
    try:
        parts = review.split("\n")[0].replace(",", " ").split(" ")
        if len(parts) == 2:
            return float(parts[0]), float(parts[1])
    except (ValueError, AttributeError):
        pass
    return -1.0, -1.0


def llava_bench_summary(reviews: Iterable[Mapping], ignore: Iterable[int] = ()) -> dict:
    """summarize_gpt_review for one review file: {group: {ref, model, relative, ref_x10, model_x10, n}}."""
    ignore = set(ignore)
    groups = defaultdict(list)
    for review in reviews:
        if review.get("question_id") in ignore:
            continue
        if "category" in review:
            groups[review["category"]].append(review["tuple"])
            groups["all"].append(review["tuple"])
        else:
            groups["all"].append(review["tuple"] if "tuple" in review else review["score"])
    out = {}
    for group, values in sorted(groups.items()):
        ref, model = (round(x, 3) for x in np.asarray(values).mean(0).tolist())
        out[group] = {"n": len(values), "ref": ref, "model": model, "relative": round(model / ref * 100, 1),
                      "ref_x10": round(ref * 10, 1), "model_x10": round(model * 10, 1)}
    return out


def llava_bench_mean_over_runs(summaries: Sequence[Mapping]) -> dict:
    """The paper number: per group, the mean of the printed relative scores over review runs."""
    groups = [g for g in summaries[0] if all(g in s for s in summaries)]
    return {g: sum(s[g]["relative"] for s in summaries) / len(summaries) for g in groups}




def review_run_name(path: Path) -> str:
    return Path(path).name.replace("gpt4_text_", "").replace(".jsonl", "")


def score_llava_bench(review_files: list[Path], ignore: list[int] | None = None) -> dict:
    runs = {review_run_name(f): llava_bench_summary(read_jsonl(f), ignore or ()) for f in review_files}
    mean = llava_bench_mean_over_runs(list(runs.values()))
    return {"benchmark": "llava_bench", "headline": mean.get("all"),
            "headline_metric": f"relative score 'all', mean over {len(runs)} review run(s)",
            "runs": runs, "mean_over_runs": mean}


def _table_llava_bench(r: dict) -> None:
    rows = [(run, g, s["relative"], s["ref_x10"], s["model_x10"]) for run, summary in r["runs"].items()
            for g, s in summary.items()]
    print_table("LLaVA-Bench (In-the-Wild)", ("run", "category", "relative", "ref x10", "model x10"), rows)
    print("mean over runs: " + ", ".join(f"{g} {v:.2f}" for g, v in r["mean_over_runs"].items()))


def add_parser(sub, add_common) -> dict:
    """The `python -m llava_sft.eval.score llava_bench` arguments; {benchmark: (run, print table)}."""
    p = sub.add_parser("llava_bench", help="LLaVA-Bench In-the-Wild (summarize_gpt_review.py)")
    add_common(p, "GPT-4 review file(s), one per judge run (JSONL)", None, several=True)
    p.add_argument("--ignore", type=int, nargs="*", default=None, help="question ids to leave out")
    return {
        "llava_bench": (lambda a: score_llava_bench(a.answers, a.ignore), _table_llava_bench),
    }
