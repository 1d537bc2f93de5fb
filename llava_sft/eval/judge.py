"""The LLM-judge step of LLaVA-Bench (In-the-Wild) and MM-Vet, through an OpenAI-compatible HTTP API.

    python -m llava_sft.eval.judge llava_bench --questions questions.jsonl --context context.jsonl \\
        --reference answers_gpt4.jsonl --answers answers.jsonl --out reviews-eval1.jsonl
    python -m llava_sft.eval.judge mm_vet --mmvet mm-vet.json --answers results.json --out grades.json [--num-run 1]

Then score with `python -m llava_sft.eval.score llava_bench --answers reviews-eval*.jsonl` and
`python -m llava_sft.eval.score mm_vet --answers grades.json --annotations mm-vet.json`.

Judge endpoint: POST {base_url}/chat/completions with {model, messages, temperature, max_tokens}
(the shared client llava_sft.chat_client.ChatClient, standard library only). --base-url / --model / --api-key, or LLAVA_JUDGE_BASE_URL (default
https://api.openai.com/v1), LLAVA_JUDGE_MODEL (default: the reference's model, gpt-4-0314 for LLaVA-Bench,
gpt-4-0613 for MM-Vet) and OPENAI_API_KEY (sent as a Bearer token; required for api.openai.com).
429, 5xx, timeouts and connection errors are retried with exponential backoff (Retry-After honoured);
401/403 and other 4xx stop with an error naming the status and the server's message.

Both flows are resumable: items already in --out are not sent again.

Reference flows reproduced (see the module docstring of llava_sft.eval.metrics for the commits):
  * LLaVA llava/eval/eval_gpt_review_bench.py + llava/eval/table/rule.json: per question, the context is
    '\\n'.join(context["caption"]) of the context row with the question's image (literally: a caption
    *string* is joined character by character, as the reference does), the rule = rule.json
    ["llava_bench_" + category] (conv/detail/complex share one prompt), messages = [system "You are a
    helpful and precise assistant for checking the quality of the answer.", user CONTENT] with
    CONTENT = "[Context]\\n{caption}\\n\\n[Question]\\n{question}\\n\\n[{role} 1]\\n{reference answer}\\n\\n"
    "[End of {role} 1]\\n\\n[{role} 2]\\n{model answer}\\n\\n[End of {role} 2]\\n\\n[System]\\n{prompt}\\n\\n",
    temperature 0.2, max_tokens 1024. Review row: {id (1-based position in the question file),
    question_id, answer1_id (reference answer's answer_id, else its question_id), answer2_id (model
    answer's answer_id), category, content, tuple (parse_score = metrics.llava_bench_parse_score)}.
    Answer 1 is the GPT-4 reference answer, answer 2 the model's. The reference pairs the three files
    by line position; we pair by question_id (the same on LLaVA's files) and fail on a missing answer.
  * yuweihao/MM-Vet mm-vet_evaluator.py `runs`: for each run j and each id of mm-vet.json not yet graded
    j+1 times, one user message = PROMPT + "\\n" + " | ".join([question, answer with "<AND>"/"<OR>"
    padded by spaces, prediction, ""]), temperature 0.0, max_tokens 3; score = float of the reply's
    first space-separated token (stripped), accepted when within [0, 1]; otherwise the question is asked
    again with "\\nPredict the correctness of the answer (digit): " appended, at temperatures 0.0, 0.5,
    1.0, 1.5, 2.0, and after the 5th retry the score is 0.0. Stored per run: the reply's model, the
    parsed token (or the last raw reply when it gave up) and the score; the grade file
    {"v1_<qid>": {"model": [...], "content": [...], "score": [...]}} is rewritten (indent 4) after every
    sample.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Mapping

from llava_sft.chat_client import ChatClient, ChatError
from llava_sft.eval.metrics import llava_bench_parse_score

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_MODELS = {"llava_bench": "gpt-4-0314", "mm_vet": "gpt-4-0613"}


class JudgeError(ChatError):
    """The judge cannot be used (bad inputs; HTTP problems are `ChatError`s of the shared client)."""


# ============================================================================ LLaVA-Bench (In-the-Wild)
LLAVA_BENCH_SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
_LLAVA_BENCH_PROMPT = (
    "We would like to request your feedback on the performance of two AI assistants in response to the user "
    "question displayed above. The user asks the question on observing an image. For your reference, the visual "
    "content in the image is represented with a few sentences describing the image. \n"
    "Please rate the helpfulness, relevance, accuracy, level of details of their responses. Each assistant "
    "receives an overall score on a scale of 1 to 10, where a higher score indicates better overall performance.\n"
    "Please first output a single line containing only two values indicating the scores for Assistant 1 and 2, "
    "respectively. The two scores are separated by a space.\n"
    "In the subsequent line, please provide a comprehensive explanation of your evaluation, avoiding any "
    "potential bias and ensuring that the order in which the responses were presented does not affect your "
    "judgment.")
# LLaVA llava/eval/table/rule.json, the entries eval_gpt_review_bench.py uses
LLAVA_BENCH_RULES = {f"llava_bench_{c}": {"role": "Assistant", "prompt": _LLAVA_BENCH_PROMPT}
                     for c in ("conv", "detail", "complex")}
LLAVA_BENCH_TEMPERATURE, LLAVA_BENCH_MAX_TOKENS = 0.2, 1024


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def llava_bench_content(caption: str, question: str, role: str, answer1: str, answer2: str, prompt: str) -> str:
    return (f"[Context]\n{caption}\n\n"
            f"[Question]\n{question}\n\n"
            f"[{role} 1]\n{answer1}\n\n[End of {role} 1]\n\n"
            f"[{role} 2]\n{answer2}\n\n[End of {role} 2]\n\n"
            f"[System]\n{prompt}\n\n")


def run_llava_bench(client: ChatClient, questions: Path, context: Path, reference: Path, answers: Path, out: Path,
                    rules: Mapping | None = None, max_tokens: int = LLAVA_BENCH_MAX_TOKENS,
                    temperature: float = LLAVA_BENCH_TEMPERATURE) -> int:
    """Append one review row per question not yet in `out`; returns the number of new reviews."""
    rules = rules or LLAVA_BENCH_RULES
    image_to_context = {c["image"]: c for c in read_jsonl(context)}
    refs = {r["question_id"]: r for r in read_jsonl(reference)}
    model_answers = {a["question_id"]: a for a in read_jsonl(answers)}
    qs = read_jsonl(questions)
    missing = [q["question_id"] for q in qs if q["question_id"] not in refs or q["question_id"] not in model_answers]
    if missing:
        raise JudgeError(f"llava_bench: no reference or model answer for question_id(s) {missing[:10]}")
    done = {r["question_id"] for r in read_jsonl(out)} if Path(out).is_file() else set()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    new = 0
    with Path(out).open("a", encoding="utf-8") as f:
        for idx, q in enumerate(qs):
            if q["question_id"] in done:
                continue
            category = "llava_bench_" + q["category"]
            if category not in rules:
                raise JudgeError(f"llava_bench: category {category!r} not in the rule file")
            if q["image"] not in image_to_context:
                raise JudgeError(f"llava_bench: no context row for image {q['image']!r}")
            caption = image_to_context[q["image"]]["caption"]
            cap_str = "\n".join(caption)  # literally as the reference (a string is joined per character)
            ans1, ans2 = refs[q["question_id"]], model_answers[q["question_id"]]
            rule = rules[category]
            content = llava_bench_content(cap_str, q["text"], rule["role"], ans1["text"], ans2["text"], rule["prompt"])
            review, _ = client.chat([{"role": "system", "content": LLAVA_BENCH_SYSTEM},
                                     {"role": "user", "content": content}], temperature, max_tokens)
            row = {"id": idx + 1, "question_id": q["question_id"],
                   "answer1_id": ans1.get("answer_id", ans1["question_id"]),
                   "answer2_id": ans2.get("answer_id", ans2["question_id"]),
                   "category": category, "content": review, "tuple": list(llava_bench_parse_score(review))}
            f.write(json.dumps(row) + "\n")
            f.flush()
            new += 1
            print(f"llava_bench: reviewed {q['question_id']} ({idx + 1}/{len(qs)})", file=sys.stderr)
    return new


# ============================================================================ MM-Vet
MM_VET_PROMPT = """Compare the ground truth and prediction from AI models, to give a correctness score for the prediction. <AND> in the ground truth means it is totally right only when all elements in the ground truth are present in the prediction, and <OR> means it is totally right when any one element in the ground truth is present in the prediction. The correctness score is 0.0 (totally wrong), 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, or 1.0 (totally right). Just complete the last space of the correctness score.

Question | Ground truth | Prediction | Correctness
--- | --- | --- | ---
What is x in the equation? | -1 <AND> -5 | x = 3 | 0.0
What is x in the equation? | -1 <AND> -5 | x = -1 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -5 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -5 or 5 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -1 or x = -5 | 1.0
Can you explain this meme? | This meme is poking fun at the fact that the names of the countries Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes, while Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues because the names of these countries do not accurately represent their landscapes. | The meme talks about Iceland and Greenland. It's pointing out that despite their names, Iceland is not very icy and Greenland isn't very green. | 0.4
Can you explain this meme? | This meme is poking fun at the fact that the names of the countries Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes, while Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues because the names of these countries do not accurately represent their landscapes. | The meme is using humor to point out the misleading nature of Iceland's and Greenland's names. Iceland, despite its name, has lush green landscapes while Greenland is mostly covered in ice and snow. The text 'This is why I have trust issues' is a playful way to suggest that these contradictions can lead to distrust or confusion. The humor in this meme is derived from the unexpected contrast between the names of the countries and their actual physical characteristics. | 1.0
"""
MM_VET_RETRY_SUFFIX = "\nPredict the correctness of the answer (digit): "
MM_VET_MAX_TOKENS, MM_VET_MAX_TRIES = 3, 5


def mm_vet_question(question: str, answer: str, prediction: str, retry: bool = False, prompt: str = MM_VET_PROMPT) -> str:
    text = prompt + "\n" + " | ".join([question, answer.replace("<AND>", " <AND> ").replace("<OR>", " <OR> "),
                                       prediction, ""])
    return text + MM_VET_RETRY_SUFFIX if retry else text


def _mm_vet_parse(content) -> tuple[str, float]:
    token = content.split(" ")[0].strip()
    score = float(token)
    if score > 1.0 or score < 0.0:
        raise ValueError(f"score {score} out of [0, 1]")
    return token, score


def mm_vet_grade_one(client: ChatClient, sample: Mapping, prediction: str, prompt: str = MM_VET_PROMPT
                     ) -> tuple[str, str, float]:
    """One grading of one sample, as the evaluator's inner loop: (model, content, score)."""
    temperature = 0.0
    content, model = client.chat([{"role": "user", "content": mm_vet_question(
        sample["question"], sample["answer"], prediction, prompt=prompt)}], temperature, MM_VET_MAX_TOKENS)
    retry_text = mm_vet_question(sample["question"], sample["answer"], prediction, retry=True, prompt=prompt)
    try_time = 1
    while True:
        try:
            content, score = _mm_vet_parse(content)
            return model, content, score
        except Exception:  # noqa: BLE001 -- the reference's bare except (None content, non-number, out of range)
            content, model = client.chat([{"role": "user", "content": retry_text}], temperature, MM_VET_MAX_TOKENS)
            try_time += 1
            temperature += 0.5
            print(f"mm_vet: try {try_time}: {content!r}", file=sys.stderr)
            if try_time > MM_VET_MAX_TRIES:
                return model, content, 0.0


def _write_json_atomic(path: Path, obj) -> None:
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(obj, indent=4), encoding="utf-8")
    os.replace(tmp, path)


def load_mm_vet_results(path: Path) -> dict[str, str]:
    """The evaluator's results JSON {"v1_<qid>": text}, or a LLaVA answer JSONL (converted as
    convert_mmvet_for_eval.py does)."""
    if Path(path).suffix == ".jsonl":
        return {f"v1_{a['question_id']}": a["text"] for a in read_jsonl(path)}
    return json.loads(Path(path).read_text(encoding="utf-8"))


def run_mm_vet(client: ChatClient, mmvet: Path, answers: Path, out: Path, num_run: int = 1,
               prompt: str = MM_VET_PROMPT) -> int:
    """Grade every sample of mm-vet.json num_run times, keeping grades already in `out`; returns new gradings."""
    data = json.loads(Path(mmvet).read_text(encoding="utf-8"))
    results = load_mm_vet_results(answers)
    missing = [k for k in data if k not in results]
    if missing:
        raise JudgeError(f"mm_vet: {len(missing)} MM-Vet id(s) have no model answer in {answers}: {missing[:10]}")
    grades = json.loads(Path(out).read_text(encoding="utf-8")) if Path(out).is_file() else {}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    new = 0
    for j in range(num_run):
        for key, sample in data.items():
            if key in grades and len(grades[key]["score"]) >= j + 1:
                continue
            model, content, score = mm_vet_grade_one(client, sample, results[key], prompt)
            grade = grades.get(key, {"model": [], "content": [], "score": []})
            if len(grade["model"]) >= j + 1:
                grade["model"][j], grade["content"][j], grade["score"][j] = model, content, score
            else:
                grade["model"].append(model)
                grade["content"].append(content)
                grade["score"].append(score)
            grades[key] = grade
            _write_json_atomic(Path(out), grades)
            new += 1
            print(f"mm_vet: run {j + 1} {key}: {score}", file=sys.stderr)
    if not Path(out).is_file():
        _write_json_atomic(Path(out), grades)
    return new


# ============================================================================ CLI
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m llava_sft.eval.judge", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")

    def common(p):
        p.add_argument("--out", type=Path, required=True)
        p.add_argument("--base-url", default=None, help=f"env LLAVA_JUDGE_BASE_URL, default {DEFAULT_BASE_URL}")
        p.add_argument("--model", default=None, help="judge model (env LLAVA_JUDGE_MODEL; default the reference's)")
        p.add_argument("--api-key", default=None, help="env OPENAI_API_KEY")
        p.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
        p.add_argument("--max-retries", type=int, default=8, help="retries on 429/5xx/timeouts")
        p.add_argument("--backoff", type=float, default=1.0, help="first retry delay (s), doubled each retry")

    p = sub.add_parser("llava_bench", help="LLaVA-Bench (In-the-Wild) GPT review (eval_gpt_review_bench.py)")
    p.add_argument("--questions", type=Path, required=True, help="questions.jsonl")
    p.add_argument("--context", type=Path, required=True, help="context.jsonl (captions per image)")
    p.add_argument("--reference", type=Path, required=True, help="answers_gpt4.jsonl (answer 1)")
    p.add_argument("--answers", type=Path, required=True, help="the model's answer JSONL (answer 2)")
    p.add_argument("--rule", type=Path, default=None, help="a rule.json to use instead of the built-in entries")
    p.add_argument("--max-tokens", type=int, default=LLAVA_BENCH_MAX_TOKENS)
    common(p)
    p = sub.add_parser("mm_vet", help="MM-Vet GPT grading (mm-vet_evaluator.py)")
    p.add_argument("--mmvet", type=Path, required=True, help="mm-vet.json (question, answer, capability per id)")
    p.add_argument("--answers", type=Path, required=True,
                   help='results JSON {"v1_<qid>": text} (or the LLaVA answer JSONL)')
    p.add_argument("--num-run", type=int, default=1, help="grading runs per sample (the paper's 7B number: 3)")
    common(p)
    return ap


def make_client(args) -> ChatClient:
    base_url = args.base_url or os.environ.get("LLAVA_JUDGE_BASE_URL") or DEFAULT_BASE_URL
    model = args.model or os.environ.get("LLAVA_JUDGE_MODEL") or DEFAULT_MODELS[args.benchmark]
    api_key = args.api_key or os.environ.get("OPENAI_API_KEY")
    if not api_key and base_url.rstrip("/") == DEFAULT_BASE_URL:
        raise JudgeError("no API key for api.openai.com: set OPENAI_API_KEY or --api-key "
                         "(or point --base-url / LLAVA_JUDGE_BASE_URL at another OpenAI-compatible server)")
    return ChatClient(base_url, model, api_key, timeout=args.timeout, max_retries=args.max_retries,
                      backoff=args.backoff, name="judge")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        client = make_client(args)
        if args.benchmark == "llava_bench":
            rules = json.loads(args.rule.read_text(encoding="utf-8")) if args.rule else None
            n = run_llava_bench(client, args.questions, args.context, args.reference, args.answers, args.out,
                                rules, args.max_tokens)
        else:
            n = run_mm_vet(client, args.mmvet, args.answers, args.out, args.num_run)
    except ChatError as e:  # JudgeError included
        raise SystemExit(f"judge {args.benchmark}: {e}") from None
    print(f"{n} new judgement(s) ({client.n_requests} request(s) to {client.url}) -> {args.out}")
    return n


if __name__ == "__main__":
    main()
