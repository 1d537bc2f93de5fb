"""Open-answer VQA scorers of `python -m llava_sft.eval.score`: vqav2, vizwiz, textvqa, gqa.

Local accuracy where annotations are at hand (a val split), and the files the official servers /
scripts take (LLaVA's convert_vqav2_for_submission.py, convert_vizwiz_for_submission.py,
convert_gqa_for_eval.py). Protocol details: metrics.py.
"""
from __future__ import annotations

from pathlib import Path

from llava_sft.eval import metrics as M
from llava_sft.eval.score_common import print_table, read_json, read_jsonl, read_jsonl_tolerant, write_json


def _load_any(path: Path):
    return read_jsonl(path) if Path(path).suffix == ".jsonl" else read_json(path)


def vqa_annotations(path: Path, key: str = "question_id") -> dict:
    """{key: annotation} from an official VQA annotation file ({"annotations": [...]}), a VizWiz
    annotation list, or JSONL rows; each annotation has "answers" (strings or {"answer": ...})."""
    data = _load_any(path)
    items = data["annotations"] if isinstance(data, dict) and "annotations" in data else data
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a list of annotations or {{'annotations': [...]}}")
    return {a[key]: a for a in items}


def _vqa_result(name: str, items: list, n_ids: int, n_missing: int, extra: dict) -> dict:
    result = M.vqa_scores(items)
    return {"benchmark": name, "headline": result["accuracy"] * 100, "headline_metric": "VQA accuracy (%)",
            **result, "n_missing_predictions": n_missing, "n_unannotated": n_ids - len(items), **extra}


def score_vqav2(answers: Path, annotations: Path | None = None, questions: Path | None = None,
                submission: Path | None = None) -> dict:
    rows, bad = read_jsonl_tolerant(answers)
    preds = {r["question_id"]: r["text"] for r in rows}
    question_ids = [q["question_id"] for q in read_jsonl(questions)] if questions else None
    extra = {"n_answers": len(preds), "error_lines": bad}
    if submission is not None:
        upload = M.vqav2_submission(preds, question_ids)
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
    return _vqa_result("vqav2", items, len(ids), sum(qid not in preds for qid in scored), extra)


def score_vizwiz(answers: Path, questions: Path, annotations: Path | None = None,
                 submission: Path | None = None) -> dict:
    rows, bad = read_jsonl_tolerant(answers)
    preds = {r["question_id"]: r["text"] for r in rows}
    qs = read_jsonl(questions)
    extra = {"n_answers": len(preds), "error_lines": bad}
    if submission is not None:
        upload = M.vizwiz_submission(preds, qs)
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
    return _vqa_result("vizwiz", items, len(qs), sum(q["question_id"] not in preds for q in scored), extra)


def score_textvqa(answers: Path, annotations: Path) -> dict:
    """eval_textvqa: each answer row matched to (image_id, question from the prompt)."""
    data = read_json(annotations)
    ann = {(a["image_id"], a["question"].lower()): a for a in (data["data"] if isinstance(data, dict) else data)}
    scores = []
    for row in read_jsonl(answers):
        key = (row["question_id"], M.textvqa_prompt_question(row["prompt"]))
        if key not in ann:
            raise ValueError(f"TextVQA answer {key} has no annotation")
        scores.append(M.textvqa_accuracy(row["text"], ann[key]["answers"]))
    if not scores:
        raise ValueError(f"{answers}: no answers")
    accuracy = sum(scores) / len(scores)
    return {"benchmark": "textvqa", "headline": accuracy * 100, "headline_metric": "TextVQA accuracy (%)",
            "n": len(scores), "accuracy": accuracy}


def score_gqa(answers: Path, annotations: Path | None = None, submission: Path | None = None) -> dict:
    predictions = M.gqa_predictions(read_jsonl(answers))
    out = {"benchmark": "gqa", "headline": None, "n_answers": len(predictions)}
    if submission is not None:
        write_json(submission, predictions, indent=None)
        out["submission"] = str(submission)
    if annotations is not None:
        result = M.gqa_scores(read_json(annotations), {str(p["questionId"]): p["prediction"] for p in predictions})
        out.update(headline=result["accuracy"] * 100, headline_metric="GQA accuracy (%)", **result)
    return out


def _table(title: str):
    def show(r: dict) -> None:
        if r.get("headline") is None:
            print(f"{title}: {r.get('n_answers')} answers; no annotations, no local accuracy"
                  + (f"; submission written to {r['submission']}" if r.get("submission") else ""))
            return
        rows = [("overall", r["n"], r["accuracy"] * 100)]
        for group in ("per_answer_type", "per_kind"):
            for k, v in r.get(group, {}).items():
                rows.append((k, v["n"], v["accuracy"] * 100) if isinstance(v, dict) else (k, None, v * 100))
        print_table(title, ("subset", "n", "accuracy %"), rows)
        if r.get("n_missing_predictions"):
            print(f"WARNING: {r['n_missing_predictions']} annotated questions have no prediction (scored 0)")
        if r.get("submission"):
            print(f"submission written to {r['submission']}")
    return show


def configure(sub, add_common) -> dict:
    p = sub.add_parser("vqav2", help="VQAv2: local accuracy on val, and the test-dev upload file")
    add_common(p, "LLaVA answer file (JSONL)", "VQA annotations (v2_mscoco_val2014_annotations.json) for local accuracy")
    p.add_argument("--questions", type=Path, help="question file whose ids the upload must cover "
                                                  "(llava_vqav2_mscoco_test2015.jsonl); default: the answered ids")
    p.add_argument("--submission", type=Path, help="write the upload JSON [{question_id, answer}] here")
    p = sub.add_parser("vizwiz", help="VizWiz: local accuracy on val, and the upload file")
    add_common(p, "LLaVA answer file (JSONL)", "VizWiz annotations (val.json) for local accuracy")
    p.add_argument("--questions", type=Path, required=True, help="the LLaVA VizWiz question file (image names)")
    p.add_argument("--submission", type=Path, help="write the upload JSON [{image, answer}] here")
    p = sub.add_parser("textvqa", help="TextVQA val (eval_textvqa.py)")
    add_common(p, "LLaVA answer file (JSONL)", "TextVQA_0.5.1_val.json", True)
    p = sub.add_parser("gqa", help="GQA testdev-balanced (convert_gqa_for_eval.py + GQA eval.py accuracy)")
    add_common(p, "LLaVA answer file (JSONL)", "testdev_balanced_questions.json for local accuracy")
    p.add_argument("--submission", type=Path, help="write testdev_balanced_predictions.json here")
    return {
        "vqav2": (lambda a: score_vqav2(a.answers, a.annotations, a.questions, a.submission), _table("VQAv2")),
        "vizwiz": (lambda a: score_vizwiz(a.answers, a.questions, a.annotations, a.submission), _table("VizWiz")),
        "textvqa": (lambda a: score_textvqa(a.answers, a.annotations), _table("TextVQA")),
        "gqa": (lambda a: score_gqa(a.answers, a.annotations, a.submission), _table("GQA")),
    }
