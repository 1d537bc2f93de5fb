"""SEED-Bench: its metric, answer parsing and file I/O, as the reference computes them.

SEED-Bench -- `seed_scores`, `seed_submission`
  * LLaVA scripts/convert_seed_for_submission.py: right iff the answer text == the GT letter exactly
    (no parsing, no strip); accuracy per question_type_id, total over all, and restricted to
    data_type "image" (the paper's SEED-IMG) and "video"; a question without prediction is wrong.
    Upload rows {question_id, prediction} per question in annotation order.

Sources and commits: llava_sft/eval/common.py.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Mapping, Sequence

from llava_sft.eval.common import (
    int_or_str,
    print_table,
    read_json,
    read_jsonl,
    write_jsonl,
)


def _lookup(mapping: Mapping, qid):
    for key in (qid, int_or_str(qid), str(qid)):
        if key in mapping:
            return mapping[key]
    return None


def seed_scores(questions: Sequence[Mapping], predictions: Mapping, type_names: Mapping | None = None) -> dict:
    """convert_seed_for_submission.eval_single: exact answer match, per type, total, image and video."""
    id_to_name = {v: k for k, v in (type_names or {}).items()}

    def evaluate(only: str | None):
        counts, right = defaultdict(int), defaultdict(int)
        for q in questions:
            if only is not None and q.get("data_type") != only:
                continue
            t = q["question_type_id"]
            counts[t] += 1
            pred = _lookup(predictions, q["question_id"])
            right[t] += pred is not None and pred == q["answer"]
        total = sum(counts.values())
        return counts, right, (sum(right.values()) / total * 100 if total else None)
    counts, right, total_acc = evaluate(None)
    return {"n": sum(counts.values()), "accuracy": total_acc,
            "per_type": {str(id_to_name.get(t, t)): right[t] / counts[t] * 100 for t in sorted(counts)},
            "image_accuracy": evaluate("image")[2], "video_accuracy": evaluate("video")[2],
            "missing": sum(_lookup(predictions, q["question_id"]) is None for q in questions)}


def seed_submission(questions: Sequence[Mapping], predictions: Mapping) -> list[dict]:
    """Upload rows {question_id, prediction} in annotation order (unanswered questions are left out)."""
    out = []
    for q in questions:
        pred = _lookup(predictions, q["question_id"])
        if pred is not None:
            out.append({"question_id": q["question_id"], "prediction": pred})
    return out


def score_seed(answers: Path, annotations: Path, submission: Path | None = None) -> dict:
    data = read_json(annotations)
    predictions = {r["question_id"]: r["text"] for r in read_jsonl(answers)}
    result = seed_scores(data["questions"], predictions, data.get("question_type"))
    out = {"benchmark": "seed", "headline": result["image_accuracy"], "headline_metric": "image accuracy (%)",
           **result}
    if submission is not None:
        write_jsonl(submission, seed_submission(data["questions"], predictions))
        out["submission"] = str(submission)
    return out


def _table_seed(r: dict) -> None:
    rows = [(t, v) for t, v in r["per_type"].items()]
    rows += [("total", r["accuracy"]), ("image", r["image_accuracy"]), ("video", r["video_accuracy"])]
    print_table("SEED-Bench", ("question type", "accuracy %"), rows)
    if r["missing"]:
        print(f"{r['missing']} questions have no prediction (scored wrong)")


def add_parser(sub, add_common) -> dict:
    """The `python -m llava_sft.eval.score seed` arguments; {benchmark: (run, print table)}."""
    p = sub.add_parser("seed", help="SEED-Bench (convert_seed_for_submission.py)")
    add_common(p, "LLaVA answer file (JSONL)", "SEED-Bench.json", True)
    p.add_argument("--submission", type=Path, help="write the upload JSONL {question_id, prediction} here")
    return {
        "seed": (lambda a: score_seed(a.answers, a.annotations, a.submission), _table_seed),
    }
