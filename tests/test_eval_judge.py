"""The LLM-judge step (llava_sft.eval.judge) against a local fake OpenAI-compatible server (never the internet).

Expected prompts are written out here from the reference sources (LLaVA eval_gpt_review_bench.py + rule.json,
MM-Vet mm-vet_evaluator.py), not produced by the module's own formatting functions."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from llava_sft.eval.judge import main as judge_main

ROOT = Path(__file__).resolve().parents[1]

LLAVA_W_SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
LLAVA_W_PROMPT = (
    "We would like to request your feedback on the performance of two AI assistants in response to the user question "
    "displayed above. The user asks the question on observing an image. For your reference, the visual content in the "
    "image is represented with a few sentences describing the image. \nPlease rate the helpfulness, relevance, "
    "accuracy, level of details of their responses. Each assistant receives an overall score on a scale of 1 to 10, "
    "where a higher score indicates better overall performance.\nPlease first output a single line containing only "
    "two values indicating the scores for Assistant 1 and 2, respectively. The two scores are separated by a space.\n"
    "In the subsequent line, please provide a comprehensive explanation of your evaluation, avoiding any potential "
    "bias and ensuring that the order in which the responses were presented does not affect your judgment.")
MM_VET_HEAD = (
    "Compare the ground truth and prediction from AI models, to give a correctness score for the prediction. <AND> in "
    "the ground truth means it is totally right only when all elements in the ground truth are present in the "
    "prediction, and <OR> means it is totally right when any one element in the ground truth is present in the "
    "prediction. The correctness score is 0.0 (totally wrong), 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, or 1.0 "
    "(totally right). Just complete the last space of the correctness score.\n\n"
    "Question | Ground truth | Prediction | Correctness\n--- | --- | --- | ---\n"
    "What is x in the equation? | -1 <AND> -5 | x = 3 | 0.0\n"
    "What is x in the equation? | -1 <AND> -5 | x = -1 | 0.5\n"
    "What is x in the equation? | -1 <AND> -5 | x = -5 | 0.5\n"
    "What is x in the equation? | -1 <AND> -5 | x = -5 or 5 | 0.5\n"
    "What is x in the equation? | -1 <AND> -5 | x = -1 or x = -5 | 1.0\n")
MEME_GT = ("This meme is poking fun at the fact that the names of the countries Iceland and Greenland are misleading. "
           "Despite its name, Iceland is known for its beautiful green landscapes, while Greenland is mostly covered in "
           "ice and snow. The meme is saying that the person has trust issues because the names of these countries do "
           "not accurately represent their landscapes.")
MM_VET_TAIL = (
    f"Can you explain this meme? | {MEME_GT} | The meme talks about Iceland and Greenland. It's pointing out that despite "
    "their names, Iceland is not very icy and Greenland isn't very green. | 0.4\n"
    f"Can you explain this meme? | {MEME_GT} | The meme is using humor to point out the misleading nature of Iceland's and "
    "Greenland's names. Iceland, despite its name, has lush green landscapes while Greenland is mostly covered in ice "
    "and snow. The text 'This is why I have trust issues' is a playful way to suggest that these contradictions can "
    "lead to distrust or confusion. The humor in this meme is derived from the unexpected contrast between the names "
    "of the countries and their actual physical characteristics. | 1.0\n")


# ------------------------------------------------------------------------------- the fake judge
class FakeJudge:
    """http.server on 127.0.0.1 (free port): records requests, answers from a queue of (status, content)."""

    def __init__(self):
        self.requests: list[dict] = []
        self.queue: list[tuple[int, str]] = []
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                judge.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                status, content = judge.queue.pop(0) if judge.queue else (200, "0.0")
                if status == 200:
                    payload = {"id": "x", "object": "chat.completion", "model": body["model"] + "-served",
                               "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                            "finish_reason": "stop"}]}
                else:
                    payload = {"error": {"message": content, "type": "test"}}
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def contents(self) -> list[str]:
        return [r["body"]["messages"][-1]["content"] for r in self.requests]


@pytest.fixture()
def fake(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.delenv("LLAVA_JUDGE_MODEL", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    server = FakeJudge()
    server.thread.start()
    yield server
    server.server.shutdown()
    server.server.server_close()


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def score(*args) -> dict:
    out = Path(args[args.index("--out") + 1])
    proc = subprocess.run([sys.executable, "-m", "llava_sft.eval.score", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return json.loads(out.read_text())


# ------------------------------------------------------------------------------- LLaVA-Bench
@pytest.fixture()
def llava_w(tmp_path):
    q = write_jsonl(tmp_path / "questions.jsonl", [
        {"question_id": 0, "image": "001.jpg", "text": "What is the name of this famous sight?", "category": "conv"},
        {"question_id": 1, "image": "001.jpg", "text": "Describe this photo in detail.", "category": "detail"}])
    c = write_jsonl(tmp_path / "context.jsonl", [
        {"id": "001", "image": "001.jpg", "caption": ["Diamond Head seen from the air.", "The ocean is blue."]}])
    r = write_jsonl(tmp_path / "answers_gpt4.jsonl", [
        {"question_id": 0, "text": "It is Diamond Head.", "answer_id": "ref0"},
        {"question_id": 1, "text": "An aerial photo of a crater.", "answer_id": "ref1"}])
    a = write_jsonl(tmp_path / "answers.jsonl", [
        {"question_id": 0, "prompt": "p", "text": "A volcano.", "answer_id": "m0", "model_id": "x", "metadata": {}},
        {"question_id": 1, "prompt": "p", "text": "A beach.", "answer_id": "m1", "model_id": "x", "metadata": {}}])
    return ["--questions", str(q), "--context", str(c), "--reference", str(r), "--answers", str(a)]


def test_llava_bench_prompt_reviews_and_score(fake, llava_w, tmp_path, monkeypatch):
    monkeypatch.setenv("LLAVA_JUDGE_BASE_URL", fake.url)  # endpoint from the environment
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    fake.queue = [(200, "8 6\nAssistant 1 is right."), (200, "10 7\nBoth fine.")]
    out = tmp_path / "reviews" / "model-eval1.jsonl"
    assert judge_main(["llava_bench", *llava_w, "--out", str(out)]) == 2

    first = fake.requests[0]
    assert first["path"] == "/v1/chat/completions" and first["auth"] == "Bearer sk-test"
    assert first["body"]["model"] == "gpt-4-0314"
    assert first["body"]["temperature"] == 0.2 and first["body"]["max_tokens"] == 1024
    expected = ("[Context]\nDiamond Head seen from the air.\nThe ocean is blue.\n\n"
                "[Question]\nWhat is the name of this famous sight?\n\n"
                "[Assistant 1]\nIt is Diamond Head.\n\n[End of Assistant 1]\n\n"
                "[Assistant 2]\nA volcano.\n\n[End of Assistant 2]\n\n"
                "[System]\n" + LLAVA_W_PROMPT + "\n\n")
    assert first["body"]["messages"] == [{"role": "system", "content": LLAVA_W_SYSTEM},
                                         {"role": "user", "content": expected}]

    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [
        {"id": 1, "question_id": 0, "answer1_id": "ref0", "answer2_id": "m0", "category": "llava_bench_conv",
         "content": "8 6\nAssistant 1 is right.", "tuple": [8.0, 6.0]},
        {"id": 2, "question_id": 1, "answer1_id": "ref1", "answer2_id": "m1", "category": "llava_bench_detail",
         "content": "10 7\nBoth fine.", "tuple": [10.0, 7.0]}]
    assert list(rows[0]) == ["id", "question_id", "answer1_id", "answer2_id", "category", "content", "tuple"]

    result = score("llava_bench", "--answers", out, "--out", tmp_path / "llava_bench.json")
    assert result["headline"] == pytest.approx(72.2)  # 6.5 / 9.0
    assert result["runs"]["model-eval1"]["llava_bench_conv"]["relative"] == 75.0
    assert result["runs"]["model-eval1"]["llava_bench_detail"]["relative"] == 70.0

    # resumable: nothing is asked again; a lost last review is asked for alone
    assert judge_main(["llava_bench", *llava_w, "--out", str(out)]) == 0
    assert len(fake.requests) == 2
    out.write_text(out.read_text().splitlines(keepends=True)[0])
    fake.queue = [(200, "10 7\nBoth fine.")]
    assert judge_main(["llava_bench", *llava_w, "--out", str(out)]) == 1
    assert len(fake.requests) == 3 and "Describe this photo in detail." in fake.contents()[2]
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows


def test_retry_on_500_then_success(fake, llava_w, tmp_path):
    fake.queue = [(500, "upstream down"), (503, "busy"), (200, "7 7\nok"), (200, "5 5\nok")]
    out = tmp_path / "r.jsonl"
    judge_main(["llava_bench", *llava_w, "--out", str(out), "--base-url", fake.url, "--backoff", "0"])
    assert len(fake.requests) == 4
    assert fake.requests[0]["body"] == fake.requests[2]["body"]  # the same request, repeated
    assert fake.requests[0]["auth"] is None  # no key configured: no Authorization header
    assert [json.loads(line)["tuple"] for line in out.read_text().splitlines()] == [[7.0, 7.0], [5.0, 5.0]]


def test_401_is_a_clear_error_without_retries(fake, llava_w, tmp_path):
    fake.queue = [(401, "Incorrect API key provided")]
    out = tmp_path / "r.jsonl"
    with pytest.raises(SystemExit) as err:
        judge_main(["llava_bench", *llava_w, "--out", str(out), "--base-url", fake.url, "--api-key", "bad",
                    "--backoff", "0"])
    message = str(err.value)
    assert "401" in message and "Incorrect API key provided" in message and "OPENAI_API_KEY" in message
    assert len(fake.requests) == 1
    assert not out.exists() or out.read_text() == ""


def test_400_is_an_error_and_missing_key_for_openai_is_refused(fake, llava_w, tmp_path):
    fake.queue = [(400, "model not found")]
    with pytest.raises(SystemExit, match="400.*model not found"):
        judge_main(["llava_bench", *llava_w, "--out", str(tmp_path / "r.jsonl"), "--base-url", fake.url])
    with pytest.raises(SystemExit, match="OPENAI_API_KEY"):  # default endpoint, no key: refused before any request
        judge_main(["llava_bench", *llava_w, "--out", str(tmp_path / "r2.jsonl")])
    assert len(fake.requests) == 1


# ------------------------------------------------------------------------------- MM-Vet
@pytest.fixture()
def mm_vet(tmp_path):
    meta = {"v1_0": {"imagename": "v1_0.png", "capability": ["ocr", "math"], "question": "What is x?",
                     "answer": "-1<AND>-5"},
            "v1_1": {"imagename": "v1_1.png", "capability": ["rec"], "question": "What animal is it?",
                     "answer": "cat<OR>kitten"},
            "v1_2": {"imagename": "v1_2.png", "capability": ["rec", "know"], "question": "Who painted it?",
                     "answer": "Van Gogh"}}
    (tmp_path / "mm-vet.json").write_text(json.dumps(meta))
    (tmp_path / "results.json").write_text(json.dumps({"v1_0": "x = -1", "v1_1": "A kitten.", "v1_2": "Monet"}))
    return tmp_path / "mm-vet.json", tmp_path / "results.json"


def test_mm_vet_prompt_grades_and_score(fake, mm_vet, tmp_path):
    meta, results = mm_vet
    out = tmp_path / "model_gpt-4-grade-2runs.json"
    args = ["mm_vet", "--mmvet", str(meta), "--answers", str(results), "--out", str(out), "--base-url", fake.url]
    # v1_1's first reply is not a number: asked again with the "(digit)" suffix
    fake.queue = [(200, "0.5"), (200, "Correctness"), (200, "1.0 because"), (200, "0.0")]
    assert judge_main(args) == 3

    expected_first = MM_VET_HEAD + MM_VET_TAIL + "\n" + "What is x? | -1 <AND> -5 | x = -1 | "
    assert fake.requests[0]["body"] == {"model": "gpt-4-0613", "messages": [{"role": "user", "content": expected_first}],
                                        "temperature": 0.0, "max_tokens": 3}
    second = MM_VET_HEAD + MM_VET_TAIL + "\n" + "What animal is it? | cat <OR> kitten | A kitten. | "
    assert fake.contents()[1] == second
    assert fake.contents()[2] == second + "\nPredict the correctness of the answer (digit): "
    assert fake.requests[2]["body"]["temperature"] == 0.0  # the first retry still at 0.0 (then +0.5 each)
    assert len(fake.requests) == 4

    grades = json.loads(out.read_text())
    assert grades == {"v1_0": {"model": ["gpt-4-0613-served"], "content": ["0.5"], "score": [0.5]},
                      "v1_1": {"model": ["gpt-4-0613-served"], "content": ["1.0"], "score": [1.0]},
                      "v1_2": {"model": ["gpt-4-0613-served"], "content": ["0.0"], "score": [0.0]}}
    assert out.read_text().startswith('{\n    "v1_0": {\n        "model": [\n')  # json.dump(indent=4)

    # resumable: the same run again asks nothing; a second run asks only for the second grades
    assert judge_main(args) == 0 and len(fake.requests) == 4
    fake.queue = [(200, "1.0"), (200, "1.0"), (200, "0.2")]
    assert judge_main(args + ["--num-run", "2"]) == 3 and len(fake.requests) == 7
    grades = json.loads(out.read_text())
    assert [grades[k]["score"] for k in ("v1_0", "v1_1", "v1_2")] == [[0.5, 1.0], [1.0, 1.0], [0.0, 0.2]]

    result = score("mm_vet", "--answers", out, "--annotations", meta, "--out", tmp_path / "mm_vet.json")
    assert result["runs"] == pytest.approx([50.0, 220 / 3])  # 100 * (0.5+1+0)/3, 100 * (1+1+0.2)/3
    assert result["headline"] == pytest.approx((50.0 + 220 / 3) / 2)
    assert result["capabilities"]["rec"] == pytest.approx(55.0)  # mean over runs of (1+0)/2, (1+0.2)/2


def test_mm_vet_gives_score_zero_after_five_retries(fake, mm_vet, tmp_path):
    meta, results = mm_vet
    meta.write_text(json.dumps({"v1_0": json.loads(meta.read_text())["v1_0"]}))
    fake.queue = [(200, "n/a")] * 5 + [(200, "still no")]
    out = tmp_path / "g.json"
    judge_main(["mm_vet", "--mmvet", str(meta), "--answers", str(results), "--out", str(out), "--base-url", fake.url])
    assert len(fake.requests) == 6
    assert [r["body"]["temperature"] for r in fake.requests] == [0.0, 0.0, 0.5, 1.0, 1.5, 2.0]
    assert json.loads(out.read_text())["v1_0"]["score"] == [0.0]
    assert json.loads(out.read_text())["v1_0"]["content"] == ["still no"]


def test_mm_vet_missing_prediction_is_an_error_before_any_request(fake, mm_vet, tmp_path):
    meta, results = mm_vet
    results.write_text(json.dumps({"v1_0": "x"}))
    with pytest.raises(SystemExit, match="v1_1"):
        judge_main(["mm_vet", "--mmvet", str(meta), "--answers", str(results), "--out", str(tmp_path / "g.json"),
                    "--base-url", fake.url])
    assert fake.requests == []
