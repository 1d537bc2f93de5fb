"""GQA: its metric, answer parsing and file I/O, as the reference computes them.

GQA -- `gqa_correct`, `gqa_predictions`, `gqa_scores`
  * LLaVA scripts/convert_gqa_for_eval.py: prediction = text.rstrip('.').lower(); the official GQA
    eval.py (shipped in LLaVA-eval playground/data/eval/gqa/data/eval/eval.py): `predicted == gold`
    with the gold answer untouched, accuracy over questions with isBalanced; open = structural type
    "query", binary otherwise.

Sources and commits: llava_sft/eval/common.py.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Iterable, Mapping

from llava_sft.eval.common import (
    read_json,
    read_jsonl,
    vqa_table,
    write_json,
)


def gqa_prediction(text: str) -> str:
    """convert_gqa_for_eval: the prediction written for GQA's eval.py."""
    return text.rstrip(".").lower()


def gqa_correct(pred: str, gold: str) -> bool:
    """GQA: processed prediction exactly equal to the (untouched) gold answer."""
    return gqa_prediction(pred) == gold


def gqa_predictions(rows: Iterable[Mapping]) -> list[dict]:
    """convert_gqa_for_eval: [{questionId, prediction}] from LLaVA answer rows."""
    return [{"questionId": r["question_id"], "prediction": gqa_prediction(r["text"])} for r in rows]


def gqa_scores(questions: Mapping[str, Mapping], predictions: Mapping[str, str]) -> dict:
    """Accuracy over balanced questions (predictions already processed, as eval.py reads them)."""
    scores, per_kind, per_struct, per_sem = [], defaultdict(list), defaultdict(list), defaultdict(list)
    missing = [qid for qid, q in questions.items() if q.get("isBalanced", True) and qid not in predictions]
    if missing:
        raise ValueError(f"{len(missing)} balanced GQA questions have no prediction, e.g. {missing[:5]}")
    for qid, q in questions.items():
        if not q.get("isBalanced", True):
            continue
        score = float(predictions[qid] == q["answer"])
        scores.append(score)
        types = q.get("types") or {}
        if "structural" in types:
            per_struct[types["structural"]].append(score)
            per_kind["open" if types["structural"] == "query" else "binary"].append(score)
        if "semantic" in types:
            per_sem[types["semantic"]].append(score)
    if not scores:
        raise ValueError("no balanced GQA question to score")

    def means(d):
        return {k: sum(v) / len(v) for k, v in sorted(d.items())}
    return {"n": len(scores), "accuracy": sum(scores) / len(scores), "per_kind": means(per_kind),
            "per_structural_type": means(per_struct), "per_semantic_type": means(per_sem)}




def score_gqa(answers: Path, annotations: Path | None = None, submission: Path | None = None) -> dict:
    predictions = gqa_predictions(read_jsonl(answers))
    out = {"benchmark": "gqa", "headline": None, "n_answers": len(predictions)}
    if submission is not None:
        write_json(submission, predictions, indent=None)
        out["submission"] = str(submission)
    if annotations is not None:
        result = gqa_scores(read_json(annotations), {str(p["questionId"]): p["prediction"] for p in predictions})
        out.update(headline=result["accuracy"] * 100, headline_metric="GQA accuracy (%)", **result)
    return out


def add_parser(sub, add_common) -> dict:
    """The `python -m llava_sft.eval.score gqa` arguments; {benchmark: (run, print table)}."""
    p = sub.add_parser("gqa", help="GQA testdev-balanced (convert_gqa_for_eval.py + GQA eval.py accuracy)")
    add_common(p, "LLaVA answer file (JSONL)", "testdev_balanced_questions.json for local accuracy")
    p.add_argument("--submission", type=Path, help="write testdev_balanced_predictions.json here")
    return {
        "gqa": (lambda a: score_gqa(a.answers, a.annotations, a.submission), vqa_table("GQA")),
    }
