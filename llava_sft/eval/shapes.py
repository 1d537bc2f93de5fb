"""Scoring for the synthetic shapes eval set written by ``data_prep.make_shapes``.

Answers are short canonical strings ("red", "circle", "2", "top left", "yes"), so
scoring is exact match after light normalisation of both prediction and answer.
"""
from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

NUMBER_WORDS = {
    "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = {"a", "an", "the"}
_SENTENCE_END = re.compile(r"(?<=[.!?])\s")
_EDGE_PUNCT = " \t\"'`.,!?;:"


def normalize_answer(text: str) -> str:
    """Canonical form of a short answer.

    Keeps only the first non-empty line and its first sentence, lower-cases,
    strips surrounding whitespace/quotes/punctuation, drops articles, maps
    number words to digits and collapses whitespace: ``"Two."`` -> ``"2"``,
    ``"The circle is red. It is..."`` -> ``"circle is red"``.
    """
    lines = [line for line in text.strip().splitlines() if line.strip()]
    first = _SENTENCE_END.split(lines[0].strip(), maxsplit=1)[0] if lines else ""
    words = first.lower().strip(_EDGE_PUNCT).split()
    words = [NUMBER_WORDS.get(w, w) for w in words if w not in ARTICLES]
    return " ".join(words)


def score_shapes(predictions: dict[int, str], answers: list[dict]) -> dict:
    """Exact-match accuracy overall and per category.

    ``answers`` are rows of ``eval/answers.jsonl``; a question id absent from
    ``predictions`` counts as wrong and is tallied in ``"missing"``.
    """
    preds = {int(qid): text for qid, text in predictions.items()}
    correct: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    missing = 0
    for row in answers:
        category = row["category"]
        total[category] += 1
        pred = preds.get(int(row["question_id"]))
        if pred is None:
            missing += 1
        elif normalize_answer(pred) == normalize_answer(row["answer"]):
            correct[category] += 1
    n = sum(total.values())
    by_type = {c: {"accuracy": correct[c] / total[c], "n": total[c]} for c in sorted(total)}
    return {
        "accuracy": sum(correct.values()) / n if n else 0.0,
        "n": n,
        "missing": missing,
        "by_type": by_type,
    }


def load_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSON-lines file, skipping blank lines."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# Questions whose answer is an attribute of one shape among several: which shape's attribute came back. The demo's
# models fail these by answering *another* shape's attribute, most often the first shape in raster order -- the
# one Stage-1 captions and descriptions name first (benchmarks/RESULTS.md, issue 15). Exact match tells how often
# they fail; this tells whether the model looked at the wrong object (binding) or misread the right one.
BINDING_CATEGORIES = ("color", "position", "shape")  # each names the meta.jsonl attribute its answer is


def binding_report(predictions: dict[int, str], answers: list[dict], questions: list[dict],
                   meta: list[dict]) -> dict:
    """For colour, position and shape questions on images with 2 or more shapes, per category: `n` and the shares
    of answers that are `right`, name `another_shape`'s attribute (of which `first_shape`: the shape first in
    raster order, cell 0..8), or `neither` (no shape in the image has it)."""
    predictions = {int(qid): text for qid, text in predictions.items()}
    shapes_of = {m["image"]: sorted(m["shapes"], key=lambda s: s["cell"]) for m in meta}
    image_of = {int(q["question_id"]): q["image"] for q in questions}
    counts: dict[str, dict[str, int]] = {}
    for row in answers:
        category, qid = row["category"], int(row["question_id"])
        shapes = shapes_of.get(image_of.get(qid, ""), [])
        if category not in BINDING_CATEGORIES or len(shapes) < 2:
            continue
        pred, gold = normalize_answer(predictions.get(qid, "")), normalize_answer(row["answer"])
        values = [normalize_answer(s[category]) for s in shapes]
        c = counts.setdefault(category, dict.fromkeys(("n", "right", "another_shape", "first_shape", "neither"), 0))
        c["n"] += 1
        if pred == gold:
            c["right"] += 1
        elif pred in values:
            c["another_shape"] += 1
            c["first_shape"] += pred == values[0]
        else:
            c["neither"] += 1
    return {cat: {"n": c["n"], **{k: round(v / c["n"], 4) for k, v in c.items() if k != "n"}}
            for cat, c in sorted(counts.items())}


def asked_shape(category: str, question: str, answer: str, shapes: list[dict]) -> dict | None:
    """The one shape a colour / shape / position question is about: the only shape with the attributes the question
    names (a colour question names the shape, a shape question the colour, a position question both), provided its
    asked attribute is the answer; None for other categories, or when the question does not single out one shape."""
    if category not in BINDING_CATEGORIES:
        return None
    words = set(re.findall(r"[a-z]+", question.lower()))  # every sentence of it, not only the first
    named = {"color": ("shape",), "shape": ("color",), "position": ("color", "shape")}[category]
    found = [s for s in shapes if all(s[key] in words for key in named)]
    if len(found) != 1 or normalize_answer(found[0][category]) != normalize_answer(answer):
        return None
    return found[0]


def variance_share(vectors: list[list[float]], labels: list) -> float:
    """Share of the total variance of `vectors` (sum of squares about their mean) that the mean per label explains
    (the between-label sum of squares; 1.0 when each label has one vector value, 0.0 when all labels share the
    same mean). Unlike a linear probe, nothing is rescaled: a label carried by a direction of tiny variance scores
    near 0 even though a probe would read it, and that is what an attention head copying the vector sees."""
    n, dim = len(vectors), len(vectors[0])
    mean = [sum(v[d] for v in vectors) / n for d in range(dim)]
    total = sum((v[d] - mean[d]) ** 2 for v in vectors for d in range(dim))
    groups: dict = defaultdict(list)
    for v, label in zip(vectors, labels, strict=True):
        groups[label].append(v)
    between = sum(len(g) * sum((sum(v[d] for v in g) / len(g) - mean[d]) ** 2 for d in range(dim))
                  for g in groups.values())
    return between / total if total > 0 else 0.0


def feature_signal(features_by_image: dict[str, list[list[float]]], meta: list[dict]) -> dict:
    """For the image token at each shape's cell (one token per grid cell: the demo's 3 x 3 patches), the
    variance_share of its feature explained by the shape's cell, colour and shape, and `n`, the vectors counted.
    `features_by_image` maps an image name to its 9 token vectors; images it lacks are skipped. A label unrelated to
    the features still scores about (labels - 1) / (n - 1) (the group means of a finite sample scatter): 8 / (n - 1)
    for the cell, 0.014 on the demo's 586 eval shapes."""
    vectors, keys = [], {"cell": [], "color": [], "shape": []}
    for m in meta:
        tokens = features_by_image.get(m["image"])
        for s in m["shapes"] if tokens is not None else ():
            vectors.append(tokens[s["cell"]])
            for k in keys:
                keys[k].append(s[k])
    if not vectors:
        return {}
    return {**{k: round(variance_share(vectors, labels), 4) for k, labels in keys.items()}, "n": len(vectors)}
