"""MME: its metric, answer parsing and file I/O, as the reference computes them.

MME -- `mme_parse`, `mme_task_score`, `mme_scores`, `mme_question_key`
  * LLaVA-eval playground/data/eval/MME/convert_answer_to_mme.py: task = question_id before the first
    '/', GT file = last path part up to its first '.' + ".txt"; question = prompt without
    "Answer the question using a single word or phrase." (then stripped) + " Please answer yes or no."
    falling back to the double-space variant "  Please answer yes or no." when that is the GT text;
    rows per task in answer-file order.
  * BradyFU/Awesome-Multimodal-Large-Language-Models@1c1d69e138b57cf8b0400427927bfb8ed4285458
    tools/eval_tool.zip:eval_tool/calculation.py: consecutive rows form an image pair; prediction
    lower-cased; exactly "yes"/"no", else "yes" in its first 4 characters -> yes, elif "no" in them ->
    no, else "other" (wrong); acc = right / rows, acc+ = pairs with both right / pairs;
    subtask score = acc*100 + acc+*100; perception = sum of the 10 perception subtasks, cognition of
    the 4 cognition subtasks, summed in the reference order.

Sources and commits: llava_sft/eval/common.py.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Mapping, Sequence

from llava_sft.eval.common import (
    print_table,
    read_jsonl,
)

MME_TASKS = {
    "Perception": ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                   "artwork", "OCR"),
    "Cognition": ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"),
}
MME_INSTRUCTION = "Answer the question using a single word or phrase."
MME_SUFFIX = " Please answer yes or no."


def mme_parse(text: str) -> str:
    """calculation.py parse_pred_ans on the lower-cased prediction: "yes", "no" or "other"."""
    text = text.lower()
    if text in ("yes", "no"):
        return text
    if "yes" in text[:4]:
        return "yes"
    if "no" in text[:4]:
        return "no"
    return "other"


def mme_question_key(question_id: str, prompt: str, gt_keys) -> tuple[str, str, str]:
    """convert_answer_to_mme: (task, "<image stem>.txt", GT question) of one LLaVA answer row."""
    task = question_id.split("/")[0]
    file = question_id.split("/")[-1].split(".")[0] + ".txt"
    question = prompt
    if MME_INSTRUCTION in question:
        question = question.replace(MME_INSTRUCTION, "").strip()
    if "Please answer yes or no." not in question:
        question = question + MME_SUFFIX
        if (task, file, question) not in gt_keys:
            question = question.replace(MME_SUFFIX, " " + MME_SUFFIX)
    return task, file, question


def mme_task_score(rows: Sequence[tuple[str, str]]) -> dict:
    """One subtask from its (gt, prediction) rows in file order; rows 2k, 2k+1 are one image's pair."""
    if len(rows) % 2:
        raise ValueError(f"MME rows come in image pairs; got {len(rows)} rows")
    right = [gt.lower() == mme_parse(pred) for gt, pred in rows]
    pairs = len(rows) // 2
    acc = sum(right) / len(right)
    acc_plus = sum(right[i] and right[i + 1] for i in range(0, len(right), 2)) / pairs
    score = 0
    score += acc * 100
    score += acc_plus * 100
    return {"n": len(rows), "acc": acc, "acc_plus": acc_plus, "score": score,
            "other": sum(mme_parse(pred) == "other" for _, pred in rows)}


def mme_scores(task_rows: Mapping[str, Sequence[tuple[str, str]]]) -> dict:
    """Subtask scores and the perception / cognition totals (missing subtasks are listed, not scored)."""
    out = {"per_subtask": {}, "missing_subtasks": []}
    for kind, tasks in MME_TASKS.items():
        total = 0
        for task in tasks:
            if task not in task_rows:
                out["missing_subtasks"].append(task)
                continue
            out["per_subtask"][task] = mme_task_score(task_rows[task])
            total += out["per_subtask"][task]["score"]
        out[kind.lower()] = total
    return out




def _lines(path: Path) -> list[str]:
    """Lines as Python's readlines() splits them (on newlines only), without the line ends."""
    text = Path(path).read_text(encoding="utf-8")
    return (text[:-1] if text.endswith("\n") else text).split("\n") if text else []


def mme_ground_truth(annotations: Path) -> dict[tuple[str, str, str], str]:
    """{(task, "<stem>.txt", question): "Yes"/"No"} from eval_tool's Your_Results/<task>.txt files
    (image, question, answer) or from the MME_Benchmark_release_version tree (convert_answer_to_mme)."""
    root = Path(annotations)
    gt = {}
    flat = [root / f"{t}.txt" for kind in MME_TASKS.values() for t in kind if (root / f"{t}.txt").is_file()]
    if flat:
        for f in flat:
            for line in _lines(f):
                if line.strip():
                    image, question, answer = line.strip().split("\t")
                    gt[(f.stem, image.split(".")[0] + ".txt", question)] = answer
        return gt
    for task_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        qa_dir = task_dir / "questions_answers_YN" if (task_dir / "images").exists() else task_dir
        for f in sorted(qa_dir.glob("*.txt")):
            for line in _lines(f):
                if line.strip():
                    question, answer = line.strip().split("\t")
                    gt[(task_dir.name, f.name, question)] = answer
    if not gt:
        raise ValueError(f"no MME ground truth found under {root}")
    return gt


def mme_rows_from_answers(answers: Path, annotations: Path) -> dict[str, list[tuple]]:
    """convert_answer_to_mme: per task, (stem file, question, gt, prediction) in answer-file order."""
    gt = mme_ground_truth(annotations)
    rows = defaultdict(list)
    for a in read_jsonl(answers):
        key = mme_question_key(a["question_id"], a["prompt"], gt)
        if key not in gt:
            raise ValueError(f"MME answer {a['question_id']!r} / {key[2]!r} has no ground truth")
        rows[key[0]].append((key[1], key[2], gt[key], a["text"]))
    return rows


def mme_rows_from_eval_tool(results_dir: Path) -> dict[str, list[tuple]]:
    """calculation.py's input: <task>.txt lines `file\\tquestion\\tgt\\tprediction`."""
    rows = {}
    for kind in MME_TASKS.values():
        for task in kind:
            f = Path(results_dir) / f"{task}.txt"
            if f.is_file():
                rows[task] = []
                for number, line in enumerate(_lines(f), 1):
                    fields = tuple(line.split("\t"))
                    if len(fields) != 4:
                        raise ValueError(f"{f}:{number}: expected file, question, gt, prediction")
                    rows[task].append(fields)
    if not rows:
        raise ValueError(f"no MME <task>.txt result files in {results_dir}")
    return rows


def score_mme(answers: Path, annotations: Path | None = None, submission: Path | None = None) -> dict:
    if Path(answers).is_dir():
        rows = mme_rows_from_eval_tool(answers)
    elif annotations is None:
        raise ValueError("mme: --annotations (the MME ground truth) is needed with an answer file")
    else:
        rows = mme_rows_from_answers(answers, annotations)
    if submission is not None:
        out = Path(submission)
        out.mkdir(parents=True, exist_ok=True)
        for task, task_rows in rows.items():
            (out / f"{task}.txt").write_text("".join("\t".join(r) + "\n" for r in task_rows), encoding="utf-8")
    result = mme_scores({t: [(r[2], r[3]) for r in task_rows] for t, task_rows in rows.items()})
    return {"benchmark": "mme", "headline": result["perception"], "headline_metric": "perception score", **result}


def _table_mme(r: dict) -> None:
    print_table("MME", ("subtask", "n", "acc", "acc+", "score", "other"),
                [(t, s["n"], s["acc"], s["acc_plus"], s["score"], s["other"]) for t, s in r["per_subtask"].items()])
    print(f"Perception: {r['perception']:.4f}   Cognition: {r['cognition']:.4f}")
    if r["missing_subtasks"]:
        print(f"WARNING: missing subtasks (not in the totals): {', '.join(r['missing_subtasks'])}")


def add_parser(sub, add_common) -> dict:
    """The `python -m llava_sft.eval.score mme` arguments; {benchmark: (run, print table)}."""
    p = sub.add_parser("mme", help="MME (convert_answer_to_mme.py + calculation.py)")
    add_common(p, "LLaVA answer file (JSONL), or an eval_tool answers folder of <task>.txt files",
                "MME ground truth: eval_tool Your_Results/ (<task>.txt) or MME_Benchmark_release_version/")
    p.add_argument("--submission", type=Path, help="write the eval_tool answer files (<task>.txt) to this folder")
    return {
        "mme": (lambda a: score_mme(a.answers, a.annotations, a.submission), _table_mme),
    }
