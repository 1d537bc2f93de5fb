"""ScienceQA-IMG: its metric, answer parsing and file I/O, as the reference computes them.

ScienceQA-IMG -- `scienceqa_parse_letter`, `scienceqa_parse`, `scienceqa_scores`
  * LLaVA llava/eval/eval_science_qa.py: options A-E; the text itself equal to a letter (no strip);
    else text[0] a letter and text[1:3] == ". "; else `re.findall(r'The answer is ([A-Z]).')` with
    exactly one match (the '.' matches any character; 0 or 2+ matches -> FAILED); a letter is right
    only if it is within the question's choices (`get_pred_idx`: options[:len(choices)], so a
    negative n_choices is no choice); FAILED counts as wrong. A problem without a prediction is
    FAILED with prompt "Unknown". IMG subset = predictions whose *prompt*
    contains "<image>" (not the problem's image field). Accuracies are correct / total * 100.

Sources and commits: llava_sft/eval/common.py.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping, Sequence

from llava_sft.eval.common import (
    print_table,
    read_json,
    read_jsonl,
)

SQA_OPTIONS = ("A", "B", "C", "D", "E")
_SQA_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def scienceqa_parse_letter(text: str) -> str:
    """eval_science_qa's parsed_ans: a letter, or "FAILED"."""
    if text in SQA_OPTIONS:
        return text
    if len(text) >= 3 and text[0] in SQA_OPTIONS and text[1:3] == ". ":
        return text[0]
    found = _SQA_ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else "FAILED"


def scienceqa_parse(text: str, n_choices: int) -> int | None:
    """The option index eval_science_qa gives the prediction, or None (counted wrong)."""
    letter = scienceqa_parse_letter(text)
    # options[:len(choices)]: never a negative slice (n_choices < 0 behaves as no choices)
    return SQA_OPTIONS.index(letter) if letter in SQA_OPTIONS[:max(n_choices, 0)] else None


def scienceqa_scores(problems: Mapping[str, Mapping], split_ids: Sequence[str],
                     predictions: Mapping[str, Mapping]) -> dict:
    """eval_science_qa over a split: predictions {pid: {"text", "prompt"}}; IMG = "<image>" in prompt."""
    correct = total = img_correct = img_total = failed = 0
    results = {}
    for pid in split_ids:
        prob = problems[pid]
        pred = predictions.get(pid, {"text": "FAILED", "prompt": "Unknown"})
        letter = scienceqa_parse_letter(pred["text"])
        idx = scienceqa_parse(pred["text"], len(prob["choices"]))
        results[pid] = -1 if idx is None else idx
        right = idx == prob["answer"]
        multimodal = "<image>" in pred["prompt"]
        total += 1
        correct += right
        img_total += multimodal
        img_correct += right and multimodal
        failed += letter == "FAILED"
    if total == 0:
        raise ValueError("empty ScienceQA split")
    return {"total": total, "correct": correct, "acc": correct / total * 100,
            "img_total": img_total, "img_correct": img_correct,
            "img_acc": img_correct / img_total * 100 if img_total else 0.0,
            "parsed_FAILED": failed, "missing": sum(pid not in predictions for pid in split_ids),
            "results": results}




def score_scienceqa(answers: Path, annotations: Path, split: str = "test") -> dict:
    base = Path(annotations)
    problems = read_json(base / "problems.json")
    split_ids = read_json(base / "pid_splits.json")[split]
    predictions = {str(p["question_id"]): p for p in read_jsonl(answers)}
    result = scienceqa_scores(problems, split_ids, predictions)
    return {"benchmark": "scienceqa", "headline": result["img_acc"], "headline_metric": "IMG accuracy (%)",
            "split": split, **result}


def _table_scienceqa(r: dict) -> None:
    print_table("ScienceQA", ("subset", "n", "correct", "accuracy %"),
                [("all", r["total"], r["correct"], r["acc"]), ("IMG", r["img_total"], r["img_correct"], r["img_acc"])])
    print(f"parse failures: {r['parsed_FAILED']}, missing predictions: {r['missing']}")


def add_parser(sub, add_common) -> dict:
    """The `python -m llava_sft.eval.score scienceqa` arguments; {benchmark: (run, print table)}."""
    p = sub.add_parser("scienceqa", help="ScienceQA-IMG (eval_science_qa.py)")
    add_common(p, "LLaVA answer file (JSONL)", "folder with problems.json and pid_splits.json", True)
    p.add_argument("--split", default="test")
    return {
        "scienceqa": (lambda a: score_scienceqa(a.answers, a.annotations, a.split), _table_scienceqa),
    }
