"""MMBench: its metric, answer parsing and file I/O, as the reference computes them.

MMBench -- `mmbench_parse`, `mmbench_circular`, `mmbench_submission`
  * Official scoring is done by the MMBench server; we reproduce its circular evaluation
    (open-compass/VLMEvalKit CircularEval): rows whose index differs by multiples of 1e6 (or our
    runner's round_id rotations) are variants of one question, which counts as right only if every
    expected variant is right (a missing variant is wrong). Answer matching = VLMEvalKit's rule
    stage `can_infer`: after replacing .()[],:;!*#{} by spaces, exactly one option letter among the
    words -> it; else exactly one option text (lower-cased) contained in the answer -> it; the
    ChatGPT fallback of the server is not reproduced (unmatched = wrong). LLaVA
    scripts/convert_mmbench_for_submission.py writes the annotation columns without hint, category,
    source, image, comment, l2-category, with "prediction" = raw text (xlsx there; TSV/JSON here).

Sources and commits: llava_sft/eval/common.py.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from llava_sft.eval.common import (
    int_or_str,
    print_table,
    read_jsonl,
    read_tsv,
    write_rows,
)

_MMB_SEPARATORS = ".()[],:;!*#{}"


_MMB_REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
                 "I'm sorry, but without the image provided", "Cannot determine the answer")


def mmbench_parse(text: str, choices: Mapping[str, str]) -> str | None:
    """VLMEvalKit `can_infer` rule stage: the option letter an answer names, or None.

    choices: {letter: option text}. One option letter among the words wins; a refusal or a lone "Z"
    (none of them) is None; otherwise (no letter, or several) exactly one option text in the answer."""
    text = str(text)
    if any(refusal in text for refusal in _MMB_REFUSALS):
        return None
    mod = text
    for c in _MMB_SEPARATORS:
        mod = mod.replace(c, " ")
    words = [w.strip() for w in mod.split()]
    letters = [c for c in choices if c in words]
    if len(letters) == 1:
        return letters[0]
    if not letters and "Z" in words:
        return None
    lower = text.lower()
    by_text = [c for c, option in choices.items() if str(option).lower() in lower]
    return by_text[0] if len(by_text) == 1 else None


def mmbench_circular(variants: Iterable[Mapping]) -> dict:
    """Circular evaluation. variants: {"group", "category", "pred", "answer"} (pred None = unanswered),
    one per expected variant; a group is right only if all its variants are right."""
    groups: dict = {}
    for v in variants:
        g = groups.setdefault(v["group"], {"category": v.get("category"), "l2": v.get("l2_category"),
                                           "right": True, "n": 0})
        g["right"] = g["right"] and v["pred"] is not None and v["pred"] == v["answer"]
        g["n"] += 1
    if not groups:
        raise ValueError("no MMBench question to score")

    def acc_by(field):
        buckets = defaultdict(list)
        for g in groups.values():
            if g[field] is not None:
                buckets[g[field]].append(g["right"])
        return {k: sum(v) / len(v) for k, v in sorted(buckets.items())}
    right = [g["right"] for g in groups.values()]
    return {"n_questions": len(groups), "n_variants": sum(g["n"] for g in groups.values()),
            "overall": sum(right) / len(right), "per_category": acc_by("category"),
            "per_l2_category": acc_by("l2"), "hits": {k: g["right"] for k, g in groups.items()}}


MMBENCH_DROP_COLUMNS = ("hint", "category", "source", "image", "comment", "l2-category")


def mmbench_submission(annotation_rows: Sequence[Mapping] | None, predictions: Mapping) -> list[dict]:
    """convert_mmbench_for_submission without xlsx: annotation columns minus hint/category/source/image/
    comment/l2-category, "prediction" (raw text) inserted after them; one row per annotation row
    (prediction "" when unanswered). Without annotations: {index, prediction} per answered question."""
    if annotation_rows is None:
        return [{"index": k, "prediction": v} for k, v in predictions.items()]
    out = []
    for row in annotation_rows:
        kept = {k: v for k, v in row.items() if k not in MMBENCH_DROP_COLUMNS}
        items = list(kept.items())
        items.insert(min(6, len(items)), ("prediction", predictions.get(int_or_str(row["index"]), "")))
        out.append(dict(items))
    return out


LETTERS = "ABCD"  # LLaVA's all_options for MMBench


CIRCULAR_STRIDE = 1_000_000  # MMBench TSV: circular copies of question i have index i + k * 1e6


def _missing(value) -> bool:
    return value is None or str(value).strip() == "" or str(value).strip().lower() == "nan"


def _rotate(seq, k: int):
    k %= max(len(seq), 1)
    return list(seq[k:]) + list(seq[:k])


def mmbench_options(row: dict) -> list[str]:
    return [row[c] for c in LETTERS if c in row and not _missing(row[c])]


def mmbench_variants(answer_rows: list[dict], annotation_rows: list[dict]) -> tuple[list[dict], int]:
    """Every expected variant of every annotated question with its predicted original letter.

    Expected variants: one per annotation row, or, when the answers hold rotations (some round_id > 0),
    one per rotation of its options. Returns (variants, number of answer rows without annotation)."""
    ann = {int(r["index"]): r for r in annotation_rows}
    answers = {(int(a["question_id"]), int(a.get("round_id", 0))): a for a in answer_rows}  # last one wins
    rotations = any(round_id > 0 for _, round_id in answers)
    variants = []
    for index, row in ann.items():
        options = mmbench_options(row)
        for round_id in range(len(options) if rotations else 1):
            a = answers.get((index, round_id))
            pred = None
            if a is not None:
                shown = a.get("options") or _rotate(options, round_id)
                chars = a.get("option_char") or _rotate(LETTERS[:len(options)], round_id)
                letter = mmbench_parse(a["text"], dict(zip(LETTERS, shown, strict=False)))
                pred = chars[LETTERS.index(letter)] if letter is not None else None
            variants.append({"group": index % CIRCULAR_STRIDE, "index": index, "round_id": round_id,
                             "category": row.get("category"), "l2_category": row.get("l2-category"),
                             "pred": pred, "answer": row["answer"], "answered": a is not None})
    unknown = sum(1 for index, _ in answers if index not in ann)
    return variants, unknown


def score_mmbench(answers: Path, annotations: Path | None = None, submission: Path | None = None) -> dict:
    rows = read_jsonl(answers)
    ann_rows = read_tsv(annotations) if annotations is not None else None
    out = {"benchmark": "mmbench", "headline": None, "n_answers": len(rows)}
    if submission is not None:
        first_round = {}
        for r in sorted(rows, key=lambda r: int(r.get("round_id", 0)), reverse=True):
            first_round[int(r["question_id"])] = r["text"]  # round 0 last, so it wins
        write_rows(submission, mmbench_submission(ann_rows, first_round))
        out["submission"] = str(submission)
    if ann_rows is None or not ann_rows or "answer" not in ann_rows[0] or all(_missing(r["answer"]) for r in ann_rows):
        return out
    variants, unknown = mmbench_variants(rows, ann_rows)
    result = mmbench_circular(variants)
    single = [v for v in variants if v["round_id"] == 0 and v["index"] < CIRCULAR_STRIDE]
    out.update(headline=result["overall"] * 100, headline_metric="circular accuracy (%)",
               **{k: v for k, v in result.items() if k != "hits"},
               single_pass_accuracy=sum(v["pred"] == v["answer"] for v in single) / len(single) if single else None,
               n_unanswered_variants=sum(not v["answered"] for v in variants),
               n_unparsed=sum(v["answered"] and v["pred"] is None for v in variants),
               n_answers_without_annotation=unknown)
    return out


def _table_mmbench(r: dict) -> None:
    if r.get("headline") is None:
        print(f"MMBench: {r['n_answers']} answers; no ground truth, no local accuracy"
              + (f"; submission written to {r['submission']}" if r.get("submission") else ""))
        return
    rows = [("overall (circular)", r["n_questions"], r["overall"] * 100)]
    rows += [(c, None, v * 100) for c, v in r["per_l2_category"].items()]
    rows += [(c, None, v * 100) for c, v in r["per_category"].items()]
    print_table("MMBench", ("subset", "questions", "accuracy %"), rows)
    print(f"variants: {r['n_variants']}, unanswered: {r['n_unanswered_variants']}, unparsed: {r['n_unparsed']}; "
          f"single-pass accuracy: {r['single_pass_accuracy']}")
    if r.get("submission"):
        print(f"submission written to {r['submission']}")


def add_parser(sub, add_common) -> dict:
    """The `python -m llava_sft.eval.score mmbench` arguments; {benchmark: (run, print table)}."""
    p = sub.add_parser("mmbench", help="MMBench / MMBench-CN: circular accuracy on dev, and the upload file")
    add_common(p, "LLaVA answer file (JSONL; all rounds for circular evaluation)",
               "MMBench TSV (mmbench_dev_*.tsv) with the answer column, for local accuracy")
    p.add_argument("--submission", type=Path, help="write the predictions (.tsv, .json or .jsonl) here")
    return {
        "mmbench": (lambda a: score_mmbench(a.answers, a.annotations, a.submission), _table_mmbench),
    }
