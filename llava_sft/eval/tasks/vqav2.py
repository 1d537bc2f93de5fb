"""VQAv2: its metric, answer parsing and file I/O, as the reference computes them.

VQAv2 / VizWiz -- `vqa_normalize_answer`, `vqa_accuracy`, `vqav2_submission`, `vizwiz_submission`
  * LLaVA llava/eval/m4c_evaluator.py `EvalAIAnswerProcessor` (copied from mmf) for the answers that
    LLaVA's scripts/convert_vqav2_for_submission.py and convert_vizwiz_for_submission.py upload:
    lower-case; delete ',' and '?'; "'s" -> " 's"; '\\n'/'\\t' -> ' '; strip; punctuation
    ; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? ! is deleted when it is next to a space anywhere in the
    text (or the text has a digit,digit comma) and replaced by a space otherwise; then
    `(?!<=\\d)(\\.)(?!\\d)` is deleted -- that pattern is a negative *lookahead* for "<=digit"
    (a typo for a lookbehind), so every '.' not followed by a digit goes, and `re.UNICODE` is passed
    as the positional `count` of `sub`, so at most 32 periods are removed; then words: number words
    none/zero..ten -> digits, articles a/an/the dropped, contraction table (keys that contain capitals
    such as "Im"/"Ive" can never match after lower-casing; "somebody'd" maps to "somebodyd": both kept).
  * Accuracy (`vqa_accuracy`): GT-Vision-Lab/VQA@c4e6a0e4e84b9702d99800d3393652d92b5df224
    PythonEvaluationTools/vqaEvaluation/vqaEval.py `evaluate`, applied to the answer LLaVA submits,
    i.e. to `vqa_normalize_answer(pred)` (the issue's "accuracy of the submitted answer"). The result
    answer: '\\n'/'\\t' -> ' ', strip, processPunctuation, processDigitArticle -- always, whatever the
    GT (only some later copies, e.g. Qwen-VL's, process it only when the GT answers differ). The human
    answers: processPunctuation only (no lower-casing, no number words/articles/contractions, no strip),
    and only when the answers are not all identical (`len(set(gtAnswers)) > 1`); so e.g. "two" against
    ten "two" scores 0 ("2" != "two") and "yes" against ten "Yes" scores 0 -- real VQAv2 GT is stored
    normalised, so this only bites hand-made GT. vqaEval's commaStrip is `(\\d)(\\,)(\\d)` (one comma),
    its punctuation list and tables are those of m4c_evaluator. Score: for each human answer i,
    min(#other answers equal to the result / 3, 1), averaged over all answers (10 choose 9 subsets);
    "other" = the other *positions* (vqaEval compares annotation dicts, distinct by answer_id).
    Applying vqaEval to the raw prediction instead differs only where the submission processor
    changed it ("man's" -> "man 's", commas and '?' deleted rather than spaced).
  * VQAv2 submission: one {question_id, answer} per question of the *test split file*, in its order,
    answer "" for a question without a prediction (LLaVA answers only test-dev but uploads all test).
    VizWiz submission: one {image, answer} per question-file row; a missing prediction is an error
    (the reference asserts).

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


def vqav2_submission(predictions: Mapping, question_ids: Sequence | None = None) -> list[dict]:
    """convert_vqav2_for_submission: [{question_id, answer}] over the split's questions, "" if unanswered."""
    ids = list(predictions) if question_ids is None else question_ids
    return [{"question_id": qid, "answer": vqa_normalize_answer(predictions[qid]) if qid in predictions else ""}
            for qid in ids]


def score_vqav2(answers: Path, annotations: Path | None = None, questions: Path | None = None,
                submission: Path | None = None) -> dict:
    rows, bad = read_jsonl_tolerant(answers)
    preds = {r["question_id"]: r["text"] for r in rows}
    question_ids = [q["question_id"] for q in read_jsonl(questions)] if questions else None
    extra = {"n_answers": len(preds), "error_lines": bad}
    if submission is not None:
        upload = vqav2_submission(preds, question_ids)
        write_json(submission, upload, indent=None)
        extra.update(submission=str(submission), n_submitted=len(upload))
    if annotations is None:
        return {"benchmark": "vqav2", "headline": None, **extra}
    ann = vqa_annotations(annotations)
    ids = question_ids if question_ids is not None else list(preds)
    scored = [qid for qid in ids if qid in ann]
    if not scored:
        raise ValueError(f"none of the {len(ids)} questions has an annotation in {annotations}")
    items = [(preds.get(qid, ""), ann[qid]["answers"], ann[qid].get("answer_type")) for qid in scored]
    return vqa_result("vqav2", items, len(ids), sum(qid not in preds for qid in scored), extra)


def add_parser(sub, add_common) -> dict:
    """The `python -m llava_sft.eval.score vqav2` arguments; {benchmark: (run, print table)}."""
    p = sub.add_parser("vqav2", help="VQAv2: local accuracy on val, and the test-dev upload file")
    add_common(p, "LLaVA answer file (JSONL)", "VQA annotations (v2_mscoco_val2014_annotations.json) for local accuracy")
    p.add_argument("--questions", type=Path, help="question file whose ids the upload must cover "
                                                  "(llava_vqav2_mscoco_test2015.jsonl); default: the answered ids")
    p.add_argument("--submission", type=Path, help="write the upload JSON [{question_id, answer}] here")
    return {
        "vqav2": (lambda a: score_vqav2(a.answers, a.annotations, a.questions, a.submission), vqa_table("VQAv2")),
    }
