"""Benchmark scorers that reproduce the LLaVA-1.5 reference protocols exactly (pure functions).

Each function follows one piece of reference code, quirks included, so that the official LLaVA-1.5
prediction files give the paper numbers (checked in tests/test_eval_metrics.py against
../shared/eval_fixtures/expected_values.json). File reading/writing lives in llava_sft.eval.score*.

Sources (repo@commit/path). "LLaVA" is haotian-liu/LLaVA@c121f0432da27facab705978f83c4ada465e46fd
(HEAD 2024-05-12); "LLaVA-eval" is haotian-liu/LLaVA@32cebc3809441cc40d8ac7b2855d148308741f2a
(the commit whose playground/data/eval = LLaVA's eval.zip).

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
TextVQA -- `textvqa_accuracy`, `textvqa_prompt_question`
  * LLaVA llava/eval/m4c_evaluator.py `TextVQAAccuracyEvaluator` + llava/eval/eval_textvqa.py: exactly
    10 GT answers (asserted), same soft score by leave-one-out over answer positions, with the same
    processor on prediction and GT; an answer row is matched to its annotation by
    (question_id == image_id, question parsed from the prompt, lower-cased); prompt parsing as
    `prompt_processor` ("OCR tokens: ... Question: X Short answer:", or "Reference OCR token:" 3-line
    prompts, or 2-line prompts; anything else is an error). Not 10 answers raises
    `TextVQAAnswerCountError`, both a ValueError and (like the reference assert) an AssertionError.
GQA -- `gqa_correct`, `gqa_predictions`, `gqa_scores`
  * LLaVA scripts/convert_gqa_for_eval.py: prediction = text.rstrip('.').lower(); the official GQA
    eval.py (shipped in LLaVA-eval playground/data/eval/gqa/data/eval/eval.py): `predicted == gold`
    with the gold answer untouched, accuracy over questions with isBalanced; open = structural type
    "query", binary otherwise.
ScienceQA-IMG -- `scienceqa_parse_letter`, `scienceqa_parse`, `scienceqa_scores`
  * LLaVA llava/eval/eval_science_qa.py: options A-E; the text itself equal to a letter (no strip);
    else text[0] a letter and text[1:3] == ". "; else `re.findall(r'The answer is ([A-Z]).')` with
    exactly one match (the '.' matches any character; 0 or 2+ matches -> FAILED); a letter is right
    only if it is within the question's choices (`get_pred_idx`: options[:len(choices)], so a
    negative n_choices is no choice); FAILED counts as wrong. A problem without a prediction is
    FAILED with prompt "Unknown". IMG subset = predictions whose *prompt*
    contains "<image>" (not the problem's image field). Accuracies are correct / total * 100.
POPE -- `pope_parse`, `pope_metrics`, `pope_scores`
  * LLaVA llava/eval/eval_pope.py: keep text before the first '.', delete ',', split on ' ', any
    word equal to "No", "not" or "no" -> no, else yes (so "Nope." is yes and "NO" is yes). Answers
    are filtered by the question file's category *in answer-file order* and zipped with the label
    file *by position* (label question_ids restart at 1 and are ignored; zip truncates to the shorter).
    Label "no" -> negative, anything else positive (yes). yes_ratio = yes predictions / all
    predictions of the category. The paper's POPE = mean of the three splits' F1 x 100. Where the
    reference divides by zero (no positive predictions or labels) we return 0.0 instead of crashing.
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
LLaVA-Bench (In-the-Wild) -- `llava_bench_parse_score`, `llava_bench_summary`, `llava_bench_mean_over_runs`
  * LLaVA llava/eval/eval_gpt_review_bench.py `parse_score`: first line of the review, ',' -> ' ',
    split on single spaces; exactly two parts -> two floats, otherwise (or on a float error) (-1, -1)
    (so "8, 9" -> "8  9" -> three parts -> (-1, -1)).
  * LLaVA llava/eval/summarize_gpt_review.py: tuples grouped by review category plus "all"
    (reviews without category: "tuple" or else "score" into "all" only), `-i` ignores question ids;
    per group numpy mean of [ref, model] over reviews, each rounded to 3 dp, relative =
    round(model / ref * 100, 1), printed with round(ref * 10, 1) and round(model * 10, 1). (-1, -1)
    tuples are *not* dropped. The paper number is the mean of the printed relative values over the
    3 GPT-4 review runs (not printed by the script).
MM-Vet -- `mm_vet_scores`
  * yuweihao/MM-Vet@acde843e02dae30047bb456ee4a8ab28dee7e0ae mm-vet_evaluator.py `export_result` on a
    complete grade file: per run i, total_i = 100 * sum of score[i] over graded samples / number of
    questions (218); reported total = numpy round(mean of total_i, decimal_places) (default 1), std =
    round(population std of total_i), runs = rounded total_i. Per capability (given mm-vet.json): sum
    over samples having that capability / count of such samples; capability combinations are named
    by their sorted capabilities joined by "_" (the reference joins a Python set: hash-order dependent).
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
SEED-Bench -- `seed_scores`, `seed_submission`
  * LLaVA scripts/convert_seed_for_submission.py: right iff the answer text == the GT letter exactly
    (no parsing, no strip); accuracy per question_type_id, total over all, and restricted to
    data_type "image" (the paper's SEED-IMG) and "video"; a question without prediction is wrong.
    Upload rows {question_id, prediction} per question in annotation order.
"""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Iterable, Mapping, Sequence

import numpy as np

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


class TextVQAAnswerCountError(ValueError, AssertionError):
    """Not exactly 10 GT answers: the reference `assert len(answers) == 10` (so also an AssertionError)."""


def textvqa_accuracy(pred: str, gt_answers: Sequence) -> float:
    """TextVQAAccuracyEvaluator's soft score for one prediction (exactly 10 GT answers, as asserted there)."""
    answers = [vqa_normalize_answer(_answer_text(a)) for a in gt_answers]
    if len(answers) != 10:
        raise TextVQAAnswerCountError(f"TextVQA needs exactly 10 GT answers, got {len(answers)}")
    return _leave_one_out(vqa_normalize_answer(pred), answers)


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


def vqav2_submission(predictions: Mapping, question_ids: Sequence | None = None) -> list[dict]:
    """convert_vqav2_for_submission: [{question_id, answer}] over the split's questions, "" if unanswered."""
    ids = list(predictions) if question_ids is None else question_ids
    return [{"question_id": qid, "answer": vqa_normalize_answer(predictions[qid]) if qid in predictions else ""}
            for qid in ids]


def vizwiz_submission(predictions: Mapping, questions: Sequence[Mapping]) -> list[dict]:
    """convert_vizwiz_for_submission: [{image, answer}] in question-file order; every question needs an answer."""
    missing = [q["question_id"] for q in questions if q["question_id"] not in predictions]
    if missing:
        raise ValueError(f"{len(missing)} VizWiz questions have no prediction, e.g. {missing[:5]}")
    return [{"image": q["image"], "answer": vqa_normalize_answer(predictions[q["question_id"]])} for q in questions]


# ============================================================================ TextVQA
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


# ============================================================================ GQA
def gqa_prediction(text: str) -> str:
    """convert_gqa_for_eval: the prediction written for GQA's eval.py."""
    return text.rstrip(".").lower()


def gqa_correct(pred: str, gold: str) -> bool:
    """GQA: processed prediction exactly equal to the (untouched) gold answer."""
    return gqa_prediction(pred) == gold


def gqa_predictions(rows: Iterable[Mapping]) -> list[dict]:
    """convert_gqa_for_eval: [{questionId, prediction}] from LLaVA answer rows."""
    return [{"questionId": r["question_id"], "prediction": gqa_prediction(r["text"])} for r in rows]


def gqa_scores(questions: Mapping[str, Mapping], predictions: Mapping[str, str]) -> dict:
    """Accuracy over balanced questions (predictions already processed, as eval.py reads them)."""
    scores, per_kind, per_struct, per_sem = [], defaultdict(list), defaultdict(list), defaultdict(list)
    missing = [qid for qid, q in questions.items() if q.get("isBalanced", True) and qid not in predictions]
    if missing:
        raise ValueError(f"{len(missing)} balanced GQA questions have no prediction, e.g. {missing[:5]}")
    for qid, q in questions.items():
        if not q.get("isBalanced", True):
            continue
        score = float(predictions[qid] == q["answer"])
        scores.append(score)
        types = q.get("types") or {}
        if "structural" in types:
            per_struct[types["structural"]].append(score)
            per_kind["open" if types["structural"] == "query" else "binary"].append(score)
        if "semantic" in types:
            per_sem[types["semantic"]].append(score)
    if not scores:
        raise ValueError("no balanced GQA question to score")

    def means(d):
        return {k: sum(v) / len(v) for k, v in sorted(d.items())}
    return {"n": len(scores), "accuracy": sum(scores) / len(scores), "per_kind": means(per_kind),
            "per_structural_type": means(per_struct), "per_semantic_type": means(per_sem)}


# ============================================================================ ScienceQA
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


# ============================================================================ POPE
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


# ============================================================================ MME
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


# ============================================================================ LLaVA-Bench (In-the-Wild)
def llava_bench_parse_score(review: str) -> tuple[float, float]:
    """eval_gpt_review_bench.parse_score: the two scores on the review's first line, else (-1, -1)."""
    try:
        parts = review.split("\n")[0].replace(",", " ").split(" ")
        if len(parts) == 2:
            return float(parts[0]), float(parts[1])
    except (ValueError, AttributeError):
        pass
    return -1.0, -1.0


def llava_bench_summary(reviews: Iterable[Mapping], ignore: Iterable[int] = ()) -> dict:
    """summarize_gpt_review for one review file: {group: {ref, model, relative, ref_x10, model_x10, n}}."""
    ignore = set(ignore)
    groups = defaultdict(list)
    for review in reviews:
        if review.get("question_id") in ignore:
            continue
        if "category" in review:
            groups[review["category"]].append(review["tuple"])
            groups["all"].append(review["tuple"])
        else:
            groups["all"].append(review["tuple"] if "tuple" in review else review["score"])
    out = {}
    for group, values in sorted(groups.items()):
        ref, model = (round(x, 3) for x in np.asarray(values).mean(0).tolist())
        out[group] = {"n": len(values), "ref": ref, "model": model, "relative": round(model / ref * 100, 1),
                      "ref_x10": round(ref * 10, 1), "model_x10": round(model * 10, 1)}
    return out


def llava_bench_mean_over_runs(summaries: Sequence[Mapping]) -> dict:
    """The paper number: per group, the mean of the printed relative scores over review runs."""
    groups = [g for g in summaries[0] if all(g in s for s in summaries)]
    return {g: sum(s[g]["relative"] for s in summaries) / len(summaries) for g in groups}


# ============================================================================ MM-Vet
def mm_vet_scores(grades: Mapping[str, Mapping], num_run: int | None = None, n_questions: int | None = None,
                  decimal_places: int = 1, metadata: Mapping[str, Mapping] | None = None) -> dict:
    """MM-Vet export_result on a complete grade file {id: {"score": [per run]}}.

    Returns unrounded per-run totals, their mean and population std, the same rounded as the evaluator
    prints them, and, with `metadata` (mm-vet.json), per-capability and per-combination means."""
    runs = num_run if num_run is not None else min(len(v["score"]) for v in grades.values())
    if metadata is not None:
        n_questions = n_questions or len(metadata)
    n = n_questions or len(grades)
    sums = [0.0] * runs
    cap_sums, combo_sums = defaultdict(lambda: [0.0] * runs), defaultdict(lambda: [0.0] * runs)
    for key, value in grades.items():
        if len(value["score"]) < runs:
            raise ValueError(f"{key} has {len(value['score'])} grades, fewer than {runs} runs")
        for i in range(runs):
            sums[i] += value["score"][i]
            if metadata is not None:
                caps = set(metadata[key]["capability"])
                for c in caps:
                    cap_sums[c][i] += value["score"][i]
                combo_sums["_".join(sorted(caps))][i] += value["score"][i]
    totals = np.array(sums) / n * 100
    out = {"num_run": runs, "n_questions": n, "n_graded": len(grades), "runs": totals.tolist(),
           "total": float(totals.mean()), "std": float(totals.std()), "decimal_places": decimal_places,
           "runs_rounded": np.round(totals, decimal_places).tolist(),
           "total_rounded": float(np.round(totals.mean(), decimal_places)),
           "std_rounded": float(np.round(totals.std(), decimal_places))}
    if metadata is not None:
        cap_count, combo_count = defaultdict(int), defaultdict(int)
        for value in metadata.values():
            caps = set(value["capability"])
            for c in caps:
                cap_count[c] += 1
            combo_count["_".join(sorted(caps))] += 1
        out["capabilities"] = {c: float(np.round(np.mean(np.array(cap_sums[c]) / cap_count[c] * 100), decimal_places))
                               for c, _ in sorted(cap_count.items(), key=lambda kv: -kv[1])}
        out["capability_combinations"] = {
            c: float(np.round(np.mean(np.array(combo_sums[c]) / combo_count[c] * 100), decimal_places))
            for c, _ in sorted(combo_count.items(), key=lambda kv: -kv[1])}
    return out


# ============================================================================ MMBench
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
        items.insert(min(6, len(items)), ("prediction", predictions.get(_int_or_str(row["index"]), "")))
        out.append(dict(items))
    return out


def _int_or_str(value):
    try:
        return int(value)
    except (TypeError, ValueError):
        return value


# ============================================================================ SEED-Bench
def _lookup(mapping: Mapping, qid):
    for key in (qid, _int_or_str(qid), str(qid)):
        if key in mapping:
            return mapping[key]
    return None


def seed_scores(questions: Sequence[Mapping], predictions: Mapping, type_names: Mapping | None = None) -> dict:
    """convert_seed_for_submission.eval_single: exact answer match, per type, total, image and video."""
    id_to_name = {v: k for k, v in (type_names or {}).items()}

    def evaluate(only: str | None):
        counts, right = defaultdict(int), defaultdict(int)
        for q in questions:
            if only is not None and q.get("data_type") != only:
                continue
            t = q["question_type_id"]
            counts[t] += 1
            pred = _lookup(predictions, q["question_id"])
            right[t] += pred is not None and pred == q["answer"]
        total = sum(counts.values())
        return counts, right, (sum(right.values()) / total * 100 if total else None)
    counts, right, total_acc = evaluate(None)
    return {"n": sum(counts.values()), "accuracy": total_acc,
            "per_type": {str(id_to_name.get(t, t)): right[t] / counts[t] * 100 for t in sorted(counts)},
            "image_accuracy": evaluate("image")[2], "video_accuracy": evaluate("video")[2],
            "missing": sum(_lookup(predictions, q["question_id"]) is None for q in questions)}


def seed_submission(questions: Sequence[Mapping], predictions: Mapping) -> list[dict]:
    """Upload rows {question_id, prediction} in annotation order (unanswered questions are left out)."""
    out = []
    for q in questions:
        pred = _lookup(predictions, q["question_id"])
        if pred is not None:
            out.append({"question_id": q["question_id"], "prediction": pred})
    return out
