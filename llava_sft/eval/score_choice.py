"""Multiple-choice scorers of `python -m llava_sft.eval.score`: mmbench (circular) and seed.

MMBench answer rows are those of LLaVA's model_vqa_mmbench / our run_vqa --mode mmbench:
{question_id: TSV index, round_id, text, options (as shown, rotated), option_char (their original
letters)}; the letter the model names is mapped back through option_char. Protocol: metrics.py.
"""
from __future__ import annotations

from pathlib import Path

from llava_sft.eval import metrics as M
from llava_sft.eval.score_common import print_table, read_json, read_jsonl, read_tsv, write_jsonl, write_rows

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
                letter = M.mmbench_parse(a["text"], dict(zip(LETTERS, shown, strict=False)))
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
        write_rows(submission, M.mmbench_submission(ann_rows, first_round))
        out["submission"] = str(submission)
    if ann_rows is None or not ann_rows or "answer" not in ann_rows[0] or all(_missing(r["answer"]) for r in ann_rows):
        return out
    variants, unknown = mmbench_variants(rows, ann_rows)
    result = M.mmbench_circular(variants)
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


def score_seed(answers: Path, annotations: Path, submission: Path | None = None) -> dict:
    data = read_json(annotations)
    predictions = {r["question_id"]: r["text"] for r in read_jsonl(answers)}
    result = M.seed_scores(data["questions"], predictions, data.get("question_type"))
    out = {"benchmark": "seed", "headline": result["image_accuracy"], "headline_metric": "image accuracy (%)",
           **result}
    if submission is not None:
        write_jsonl(submission, M.seed_submission(data["questions"], predictions))
        out["submission"] = str(submission)
    return out


def _table_seed(r: dict) -> None:
    rows = [(t, v) for t, v in r["per_type"].items()]
    rows += [("total", r["accuracy"]), ("image", r["image_accuracy"]), ("video", r["video_accuracy"])]
    print_table("SEED-Bench", ("question type", "accuracy %"), rows)
    if r["missing"]:
        print(f"{r['missing']} questions have no prediction (scored wrong)")


def configure(sub, add_common) -> dict:
    p = sub.add_parser("mmbench", help="MMBench / MMBench-CN: circular accuracy on dev, and the upload file")
    add_common(p, "LLaVA answer file (JSONL; all rounds for circular evaluation)",
               "MMBench TSV (mmbench_dev_*.tsv) with the answer column, for local accuracy")
    p.add_argument("--submission", type=Path, help="write the predictions (.tsv, .json or .jsonl) here")
    p = sub.add_parser("seed", help="SEED-Bench (convert_seed_for_submission.py)")
    add_common(p, "LLaVA answer file (JSONL)", "SEED-Bench.json", True)
    p.add_argument("--submission", type=Path, help="write the upload JSONL {question_id, prediction} here")
    return {
        "mmbench": (lambda a: score_mmbench(a.answers, a.annotations, a.submission), _table_mmbench),
        "seed": (lambda a: score_seed(a.answers, a.annotations, a.submission), _table_seed),
    }
