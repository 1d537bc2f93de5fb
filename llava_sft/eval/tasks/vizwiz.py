"""VizWiz: its metric, answer parsing and file I/O, as the reference computes them.

(The answer processing and accuracy are VQAv2's: llava_sft/eval/tasks/vqav2.py.)

Sources and commits: llava_sft/eval/common.py.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from llava_sft.eval.common import (
    read_jsonl,
    read_jsonl_tolerant,
    vqa_annotations,
    vqa_normalize_answer,
    vqa_result,
    vqa_table,
    write_json,
)


def vizwiz_submission(predictions: Mapping, questions: Sequence[Mapping]) -> list[dict]:
    """convert_vizwiz_for_submission: [{image, answer}] in question-file order; every question needs an answer."""
    missing = [q["question_id"] for q in questions if q["question_id"] not in predictions]
    if missing:
        raise ValueError(f"{len(missing)} VizWiz questions have no prediction, e.g. {missing[:5]}")
    return [{"image": q["image"], "answer": vqa_normalize_answer(predictions[q["question_id"]])} for q in questions]


def score_vizwiz(answers: Path, questions: Path, annotations: Path | None = None,
                 submission: Path | None = None) -> dict:
    rows, bad = read_jsonl_tolerant(answers)
    preds = {r["question_id"]: r["text"] for r in rows}
    qs = read_jsonl(questions)
    extra = {"n_answers": len(preds), "error_lines": bad}
    if submission is not None:
        upload = vizwiz_submission(preds, qs)
        write_json(submission, upload, indent=None)
        extra.update(submission=str(submission), n_submitted=len(upload))
    if annotations is None:
        return {"benchmark": "vizwiz", "headline": None, **extra}
    ann = vqa_annotations(annotations, key="image")
    scored = [q for q in qs if q["image"] in ann]
    if not scored:
        raise ValueError(f"none of the {len(qs)} question images has an annotation in {annotations}")
    items = [(preds.get(q["question_id"], ""), ann[q["image"]]["answers"], ann[q["image"]].get("answer_type"))
             for q in scored]
    return vqa_result("vizwiz", items, len(qs), sum(q["question_id"] not in preds for q in scored), extra)


def add_parser(sub, add_common) -> dict:
    """The `python -m llava_sft.eval.score vizwiz` arguments; {benchmark: (run, print table)}."""
    p = sub.add_parser("vizwiz", help="VizWiz: local accuracy on val, and the upload file")
    add_common(p, "LLaVA answer file (JSONL)", "VizWiz annotations (val.json) for local accuracy")
    p.add_argument("--questions", type=Path, required=True, help="the LLaVA VizWiz question file (image names)")
    p.add_argument("--submission", type=Path, help="write the upload JSON [{image, answer}] here")
    return {
        "vizwiz": (lambda a: score_vizwiz(a.answers, a.questions, a.annotations, a.submission), vqa_table("VizWiz")),
    }
