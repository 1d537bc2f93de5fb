"""What the benchmark scorers (llava_sft/eval/tasks/, one module per benchmark) share: JSON / JSONL / TSV in and out,
the small table every scorer prints, and the VQA answer normalisation and soft accuracy of VQAv2, VizWiz and TextVQA.

Every scorer follows one piece of reference code, quirks included, so that the official LLaVA-1.5 prediction files
give the paper numbers (checked in tests/test_eval_metrics.py against the fixtures' expected_values.json).

Sources (repo@commit/path). "LLaVA" is haotian-liu/LLaVA@c121f0432da27facab705978f83c4ada465e46fd
(HEAD 2024-05-12); "LLaVA-eval" is haotian-liu/LLaVA@32cebc3809441cc40d8ac7b2855d148308741f2a
(the commit whose playground/data/eval = LLaVA's eval.zip).

VQA normalisation and accuracy -- `vqa_normalize_answer`, `vqa_accuracy`: see llava_sft/eval/tasks/vqav2.py.
"""
from __future__ import annotations

import csv
import json
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Mapping, Sequence


def read_json(path: Path):
    with Path(path).open(encoding="utf-8") as f:
        return json.load(f)


def read_jsonl(path: Path) -> list[dict]:
    """One JSON object per non-blank line; a bad line is an error naming file and line."""
    rows = []
    with Path(path).open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not JSON ({e})") from None
    return rows


def read_jsonl_tolerant(path: Path) -> tuple[list[dict], int]:
    """As LLaVA's VQAv2/VizWiz converters read merged answer files: bad lines are counted and skipped."""
    rows, bad = [], 0
    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                bad += 1
    return rows, bad


def read_tsv(path: Path) -> list[dict]:
    csv.field_size_limit(sys.maxsize)  # MMBench TSVs carry base64 images
    with Path(path).open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def write_json(path: Path, obj, indent: int | None = 2) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=indent, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def write_jsonl(path: Path, rows: Iterable[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def write_tsv(path: Path, rows: Sequence[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(rows[0]) if rows else []
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, delimiter="\t", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_rows(path: Path, rows: Sequence[dict]) -> Path:
    """By suffix: .tsv, .jsonl, else one JSON array."""
    suffix = Path(path).suffix.lower()
    if suffix == ".tsv":
        return write_tsv(path, rows)
    if suffix == ".jsonl":
        return write_jsonl(path, rows)
    return write_json(path, list(rows), indent=None)


def int_or_str(value):
    """A question id as the reference keys it: an int where it parses as one."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return value


def fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool) or isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4f}".rstrip("0").rstrip(".") if abs(value) < 1e6 else f"{value:.6g}"
    return str(value)


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence]) -> str:
    cells = [list(map(str, header))] + [[fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(cells[0], widths, strict=True)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
              for row in cells[1:]]
    text = "\n".join(lines)
    print(text)
    return text


# ============================================================================ VQA normalisation
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}


_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}


_ARTICLES = ("a", "an", "the")


_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
                ",", "?", "!")


_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: a lookahead, see the module docstring


_DIGIT_COMMA = re.compile(r"(?<=\d)(\,)+(?=\d)")  # m4c_evaluator COMMA_STRIP


_VQAEVAL_DIGIT_COMMA = re.compile(r"(\d)(\,)(\d)")  # vqaEval.py commaStrip (one comma only)


_PERIOD_MAX = int(re.UNICODE)  # sic: the reference passes re.UNICODE (32) as `count`


def _strip_punctuation(text: str, digit_comma: re.Pattern = _DIGIT_COMMA) -> str:
    out = text
    comma_between_digits = digit_comma.search(text) is not None
    for p in _PUNCTUATION:  # the test looks at the input text, the edit at the running output
        if p + " " in text or " " + p in text or comma_between_digits:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=_PERIOD_MAX)


def _digits_articles_contractions(text: str) -> str:
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def vqa_normalize_answer(text: str) -> str:
    """The answer as LLaVA uploads it to the VQAv2/VizWiz servers (m4c_evaluator.EvalAIAnswerProcessor)."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles_contractions(_strip_punctuation(text))


def _answer_text(answer) -> str:
    return answer["answer"] if isinstance(answer, Mapping) else answer


def _leave_one_out(pred: str, gts: Sequence[str]) -> float:
    """Mean over GT positions i of min(#(j != i with gts[j] == pred) / 3, 1)."""
    if not gts:
        raise ValueError("no ground-truth answers")
    hits = sum(1 for g in gts if g == pred)
    accs = [min(1.0, (hits - (g == pred)) / 3) for g in gts]
    return sum(accs) / len(accs)


def vqa_eval_result_answer(answer: str) -> str:
    """vqaEval.py's processing of a result-file answer: '\\n'/'\\t' -> ' ', strip, processPunctuation,
    processDigitArticle (lower-cases, numbers, articles, contractions)."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles_contractions(_strip_punctuation(answer, _VQAEVAL_DIGIT_COMMA))


def vqa_eval_gt_answers(answers: Sequence[str]) -> list[str]:
    """vqaEval.py's processing of a question's human answers: processPunctuation only (no lower-casing,
    no digits/articles/contractions, no strip), and only when the answers are not all identical."""
    answers = list(answers)
    if len(set(answers)) > 1:
        return [_strip_punctuation(a, _VQAEVAL_DIGIT_COMMA) for a in answers]
    return answers


def vqa_accuracy(pred: str, gt_answers: Sequence) -> float:
    """Official VQA accuracy (vqaEval.py) of the answer LLaVA submits for `pred` (`vqa_normalize_answer`),
    against the human answers (strings or {"answer": ...}) as vqaEval.py processes them."""
    result = vqa_eval_result_answer(vqa_normalize_answer(pred))
    return _leave_one_out(result, vqa_eval_gt_answers([_answer_text(a) for a in gt_answers]))


def vqa_scores(items: Iterable[tuple[str, Sequence, str | None]]) -> dict:
    """Mean VQA accuracy over (pred, gt_answers, answer_type) items, overall and per answer type."""
    accs, per_type = [], defaultdict(list)
    for pred, gts, answer_type in items:
        acc = vqa_accuracy(pred, gts)
        accs.append(acc)
        if answer_type is not None:
            per_type[answer_type].append(acc)
    if not accs:
        raise ValueError("nothing to score")
    return {"n": len(accs), "accuracy": sum(accs) / len(accs),
            "per_answer_type": {k: {"n": len(v), "accuracy": sum(v) / len(v)} for k, v in sorted(per_type.items())}}


def load_any(path: Path):
    return read_jsonl(path) if Path(path).suffix == ".jsonl" else read_json(path)


def vqa_annotations(path: Path, key: str = "question_id") -> dict:
    """{key: annotation} from an official VQA annotation file ({"annotations": [...]}), a VizWiz
    annotation list, or JSONL rows; each annotation has "answers" (strings or {"answer": ...})."""
    data = load_any(path)
    items = data["annotations"] if isinstance(data, dict) and "annotations" in data else data
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a list of annotations or {{'annotations': [...]}}")
    return {a[key]: a for a in items}


def vqa_result(name: str, items: list, n_ids: int, n_missing: int, extra: dict) -> dict:
    result = vqa_scores(items)
    return {"benchmark": name, "headline": result["accuracy"] * 100, "headline_metric": "VQA accuracy (%)",
            **result, "n_missing_predictions": n_missing, "n_unannotated": n_ids - len(items), **extra}


def vqa_table(title: str):
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
