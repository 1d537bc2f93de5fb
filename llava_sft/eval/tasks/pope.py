"""POPE: its metric, answer parsing and file I/O, as the reference computes them.

POPE -- `pope_parse`, `pope_metrics`, `pope_scores`
  * LLaVA llava/eval/eval_pope.py: keep text before the first '.', delete ',', split on ' ', any
    word equal to "No", "not" or "no" -> no, else yes (so "Nope." is yes and "NO" is yes). Answers
    are filtered by the question file's category *in answer-file order* and zipped with the label
    file *by position* (label question_ids restart at 1 and are ignored; zip truncates to the shorter).
    Label "no" -> negative, anything else positive (yes). yes_ratio = yes predictions / all
    predictions of the category. The paper's POPE = mean of the three splits' F1 x 100. Where the
    reference divides by zero (no positive predictions or labels) we return 0.0 instead of crashing.

Sources and commits: llava_sft/eval/common.py.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping, Sequence

from llava_sft.eval.common import (
    print_table,
    read_jsonl,
)


def pope_parse(text: str) -> str:
    """eval_pope: first sentence, commas removed, words; any of No/not/no -> "no", else "yes"."""
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def _is_positive_label(label) -> bool:
    return label != "no" if isinstance(label, str) else bool(label)


def pope_metrics(preds: Sequence, labels: Sequence) -> dict:
    """POPE metrics (positive = yes). preds: answer texts or "yes"/"no" (parsed with `pope_parse`,
    which leaves "yes"/"no" unchanged) or booleans; labels: "yes"/"no" (anything but "no" is yes) or
    booleans. Pairs are zipped by position (the shorter list wins, as in the reference)."""
    pred_pos = [pope_parse(p) == "yes" if isinstance(p, str) else bool(p) for p in preds]
    label_pos = [_is_positive_label(label) for label in labels]
    tp = fp = tn = fn = 0
    for p, y in zip(pred_pos, label_pos, strict=False):
        if p and y:
            tp += 1
        elif p:
            fp += 1
        elif not y:
            tn += 1
        else:
            fn += 1
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    n = tp + fp + tn + fn
    return {"n": n, "TP": tp, "FP": fp, "TN": tn, "FN": fn, "accuracy": (tp + tn) / n if n else 0.0,
            "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": sum(pred_pos) / len(pred_pos) if pred_pos else 0.0}


def pope_scores(answers: Sequence[Mapping], question_category: Mapping, labels: Mapping[str, Sequence]) -> dict:
    """eval_pope over splits: answers in file order, filtered per category, zipped with that split's labels."""
    splits = {}
    for category, split_labels in labels.items():
        texts = [a["text"] for a in answers if question_category[a["question_id"]] == category]
        splits[category] = pope_metrics(texts, split_labels)
        splits[category]["n_answers"] = len(texts)
        splits[category]["n_labels"] = len(split_labels)
    f1s = [s["f1"] for s in splits.values()]
    return {"splits": splits, "mean_f1_x100": sum(f1s) / len(f1s) * 100 if f1s else 0.0}




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
    result = pope_scores(rows, category, labels)
    return {"benchmark": "pope", "headline": result["mean_f1_x100"], "headline_metric": "mean F1 x100 over splits",
            **result}


def _table_pope(r: dict) -> None:
    keys = ("n", "TP", "FP", "TN", "FN", "accuracy", "precision", "recall", "f1", "yes_ratio")
    print_table("POPE", ("split",) + keys, [[c] + [s[k] for k in keys] for c, s in r["splits"].items()])
    print(f"POPE (mean F1 x100): {r['mean_f1_x100']:.2f}")


def add_parser(sub, add_common) -> dict:
    """The `python -m llava_sft.eval.score pope` arguments; {benchmark: (run, print table)}."""
    p = sub.add_parser("pope", help="POPE (eval_pope.py)")
    add_common(p, "LLaVA answer file (JSONL)", "folder of coco_pope_<split>.json label files", True)
    p.add_argument("--questions", type=Path, required=True, help="llava_pope_test.jsonl (gives each answer's split)")
    return {
        "pope": (lambda a: score_pope(a.answers, a.questions, a.annotations), _table_pope),
    }
