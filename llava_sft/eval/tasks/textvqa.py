"""TextVQA: its metric, answer parsing and file I/O, as the reference computes them.

TextVQA -- `textvqa_accuracy`, `textvqa_prompt_question`
  * LLaVA llava/eval/m4c_evaluator.py `TextVQAAccuracyEvaluator` + llava/eval/eval_textvqa.py: exactly
    10 GT answers (asserted), same soft score by leave-one-out over answer positions, with the same
    processor on prediction and GT; an answer row is matched to its annotation by
    (question_id == image_id, question parsed from the prompt, lower-cased); prompt parsing as
    `prompt_processor` ("OCR tokens: ... Question: X Short answer:", or "Reference OCR token:" 3-line
    prompts, or 2-line prompts; anything else is an error). Not 10 answers raises
    `TextVQAAnswerCountError`, both a ValueError and (like the reference assert) an AssertionError.

Sources and commits: llava_sft/eval/common.py.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from llava_sft.eval.common import (
    _answer_text,
    _leave_one_out,
    read_json,
    read_jsonl,
    vqa_normalize_answer,
    vqa_table,
)


class TextVQAAnswerCountError(ValueError, AssertionError):
    """Not exactly 10 GT answers: the reference `assert len(answers) == 10` (so also an AssertionError)."""


def textvqa_accuracy(pred: str, gt_answers: Sequence) -> float:
    """TextVQAAccuracyEvaluator's soft score for one prediction (exactly 10 GT answers, as asserted there)."""
    answers = [vqa_normalize_answer(_answer_text(a)) for a in gt_answers]
    if len(answers) != 10:
        raise TextVQAAnswerCountError(f"TextVQA needs exactly 10 GT answers, got {len(answers)}")
    return _leave_one_out(vqa_normalize_answer(pred), answers)


def textvqa_prompt_question(prompt: str) -> str:
    """eval_textvqa.prompt_processor: the (lower-cased) question inside a LLaVA TextVQA prompt."""
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        match = re.search(r"Question: (.*?) Short answer:", prompt, re.DOTALL)
        if match is None:
            raise ValueError(f"unrecognised TextVQA prompt: {prompt!r}")
        question = match.group(1)
    elif "Reference OCR token: " in prompt and len(lines) == 3:
        question = lines[1] if prompt.startswith("Reference OCR token:") else lines[0]
    elif len(lines) == 2:
        question = lines[0]
    else:
        raise ValueError(f"unrecognised TextVQA prompt: {prompt!r}")
    return question.lower()




def score_textvqa(answers: Path, annotations: Path) -> dict:
    """eval_textvqa: each answer row matched to (image_id, question from the prompt)."""
    data = read_json(annotations)
    ann = {(a["image_id"], a["question"].lower()): a for a in (data["data"] if isinstance(data, dict) else data)}
    scores = []
    for row in read_jsonl(answers):
        key = (row["question_id"], textvqa_prompt_question(row["prompt"]))
        if key not in ann:
            raise ValueError(f"TextVQA answer {key} has no annotation")
        scores.append(textvqa_accuracy(row["text"], ann[key]["answers"]))
    if not scores:
        raise ValueError(f"{answers}: no answers")
    accuracy = sum(scores) / len(scores)
    return {"benchmark": "textvqa", "headline": accuracy * 100, "headline_metric": "TextVQA accuracy (%)",
            "n": len(scores), "accuracy": accuracy}


def add_parser(sub, add_common) -> dict:
    """The `python -m llava_sft.eval.score textvqa` arguments; {benchmark: (run, print table)}."""
    p = sub.add_parser("textvqa", help="TextVQA val (eval_textvqa.py)")
    add_common(p, "LLaVA answer file (JSONL)", "TextVQA_0.5.1_val.json", True)
    return {
        "textvqa": (lambda a: score_textvqa(a.answers, a.annotations), vqa_table("TextVQA")),
    }
