"""Visual-instruction generation (data_prep.gen_instruct) against a fake OpenAI-compatible server on loopback.

The COCO files are written here; the expected symbolic contexts are worked out by hand from the pixel
boxes, and the expected messages are read from the prompt YAML files themselves (the data the module
is supposed to send), not from the module's own formatting functions."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from data_prep.gen_instruct import main as gen_main
from data_prep.gen_instruct import select_mix, split_total
from data_prep.instruct_prompts import Rejected, load_prompt_sets, parse_reply
from data_prep.symbolic import ContextError, load_coco, load_simple
from llava_sft.chat_client import ChatClient
from llava_sft.data.templates import get_template
from tests.fake_openai import FakeChatServer, no_proxy

PROMPTS = Path(__file__).resolve().parents[1] / "data_prep" / "prompts"
KINDS = ("conversation", "detail", "complex_reasoning")
RAW = {k: yaml.safe_load((PROMPTS / f"{k}.yaml").read_text()) for k in KINDS}

# image id -> the context text the LLM must see (boxes normalised by hand: x / width, y / height)
CONTEXT = {
    "1": "A brown dog lies on a green sofa.\nA dog resting on a couch.\n\n"
         "dog: [0.100, 0.100, 0.400, 0.600]\ncouch: [0.000, 0.500, 1.000, 1.000]",
    "2": "Two people ride bicycles on a road.\n\n"
         "person: [0.100, 0.100, 0.300, 0.600]\nbicycle: [0.950, 0.500, 1.000, 0.800]",  # clipped at x = 1
    "3": "A red apple on a white plate.\nAn apple on a plate.",
    "4": "A cat on a windowsill.\n\ncat: [0.100, 0.100, 0.600, 0.600]",
}


def write_coco(root: Path) -> tuple[Path, Path]:
    images = [{"id": 1, "file_name": "000000000001.jpg", "width": 640, "height": 480},
              {"id": 2, "file_name": "000000000002.jpg", "width": 320, "height": 320},
              {"id": 3, "file_name": "000000000003.jpg", "width": 100, "height": 100},
              {"id": 4, "file_name": "000000000004.jpg", "width": 200, "height": 100},
              {"id": 5, "file_name": "000000000005.jpg", "width": 100, "height": 100}]  # no caption
    captions = [(11, 1, "A brown dog lies on a green sofa."), (12, 2, "Two people ride  bicycles on a road."),
                (13, 1, "A dog resting on a couch."), (14, 3, "A red apple on a white plate."),
                (15, 3, "An apple on a plate."), (16, 4, "A cat on a windowsill."), (17, 99, "Not an image here.")]
    instances = [(21, 1, 18, [64, 48, 192, 240]), (22, 1, 63, [0, 240, 640, 240]),
                 (23, 2, 1, [32, 32, 64, 160]), (24, 2, 2, [304, 160, 100, 96]), (25, 2, 2, [10, 10, 0, 5]),
                 (26, 4, 17, [20, 10, 100, 50])]
    cap_path, inst_path = root / "captions_train2017.json", root / "instances_train2017.json"
    cap_path.write_text(json.dumps({"images": images, "annotations": [
        {"id": i, "image_id": im, "caption": c} for i, im, c in captions]}))
    inst_path.write_text(json.dumps({"images": images, "categories": [
        {"id": 1, "name": "person"}, {"id": 2, "name": "bicycle"}, {"id": 17, "name": "cat"},
        {"id": 18, "name": "dog"}, {"id": 63, "name": "couch"}], "annotations": [
        {"id": i, "image_id": im, "category_id": c, "bbox": b, "iscrowd": 0} for i, im, c, b in instances]}))
    return cap_path, inst_path


LONG_Q = "What is the brown dog doing on the green sofa in the middle of the living room this afternoon?"
LONG_A = ("The brown dog is lying stretched out on the green sofa, resting its head on one of the cushions and "
          "looking relaxed, as if it is about to fall asleep after a long walk outside in the park.")
DESCRIPTION = ("A brown dog lies comfortably on a green sofa that fills the lower half of the picture. The dog "
               "takes up the upper left part of the scene, stretched out along the cushions with its head down. "
               "The room looks quiet and homely, and nothing else competes for attention with the resting animal, "
               "which seems calm and settled in its favourite spot.")
CAT_DESCRIPTION = ("A cat sits on a windowsill in the left half of the picture, framed by the window behind it. "
                   "It looks outside, calm and attentive, while daylight falls on its fur. The sill is narrow, yet "
                   "the cat sits steadily with its paws tucked under its body, clearly at ease in this familiar "
                   "place where it likes to watch the world go by.")
REPLIES = {  # (kind, image id) -> scripted reply
    ("conversation", "1"): f"Question: {LONG_Q}\nAnswer: {LONG_A}\nQuestion: Is it sleeping?\nAnswer: Almost.",
    ("conversation", "2"): "Sure! Here is the conversation.\nQuestion: How many people?\nAnswer: Two.\n"
                           "Question: What are they riding?\nAnswer: Bicycles.",
    ("conversation", "3"): "Question: What fruit is there?\nAnswer: A red apple.\n"
                           "Question: Where is it?\nAnswer: On a plate at [0.2, 0.3].",
    ("conversation", "4"): "Question: What animal is on the windowsill?\nAnswer: A cat.\n"
                           "Question: Where is the cat?\nAnswer: It is sitting on the windowsill.",
    ("detail", "1"): DESCRIPTION,
    ("detail", "2"): "Two people on bicycles.",
    ("detail", "3"): "The caption says there is an apple on a plate. " + DESCRIPTION,
    ("detail", "4"): CAT_DESCRIPTION,
    ("complex_reasoning", "1"): f"Question: {LONG_Q}\nAnswer: {LONG_A}",  # near duplicate of the conversation
    ("complex_reasoning", "2"): "Question: Why should the riders be careful?\nAnswer: They share the road with "
                                "traffic, so they should keep to the side and watch for cars.",
    ("complex_reasoning", "3"): "Question: Is it ripe?\nAnswer: Yes.\nQuestion: Is it washed?\nAnswer: Maybe.",
    ("complex_reasoning", "4"): "Question: Why might the cat like this spot?\nAnswer: The windowsill is warm in "
                                "the sun and gives a view of the outside, which cats enjoy watching.",
}
FIRST_LINE = {ctx.split("\n")[0]: image_id for image_id, ctx in CONTEXT.items()}


def scripted(body: dict) -> tuple[int, str]:
    kind = next(k for k in KINDS if body["messages"][0]["content"] == RAW[k]["system"].rstrip("\n"))
    image_id = FIRST_LINE[body["messages"][-1]["content"].split("\n")[0]]
    return 200, REPLIES[(kind, image_id)]


@pytest.fixture()
def coco(tmp_path):
    return write_coco(tmp_path)


@pytest.fixture()
def server(monkeypatch):
    no_proxy(monkeypatch)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    srv = FakeChatServer(scripted, usage=(100, 20), delay=0.2)
    yield srv
    srv.close()


def gen_args(coco, out, server, *extra) -> list[str]:
    cap, inst = coco
    return ["--captions", str(cap), "--instances", str(inst), "--out", str(out), "--image-prefix", "coco/train2017/",
            "--mix", "conversation=1,detail=1,complex_reasoning=1", "--total", "12", "--backend", "openai",
            "--base-url", server.url, "--model", "fake-llm", "--api-key", "sk-test", "--backoff", "0",
            "--price-input", "2.0", "--price-output", "10.0", *extra]


# ------------------------------------------------------------------------------- contexts
def test_coco_contexts_normalised_boxes_and_counted_skips(coco):
    contexts = load_coco(*coco)
    assert {c.image_id: c.text() for c in contexts.images} == CONTEXT
    assert {c.image_id: c.file_name for c in contexts.images}["4"] == "000000000004.jpg"
    assert dict(contexts.skipped) == {"image without captions": 1, "caption of an image not in the file": 1,
                                      "object with an unusable box": 1}
    assert contexts.clipped_boxes == 1
    # captions only: no object lines
    assert {c.image_id: c.text() for c in load_coco(coco[0]).images}["1"] == \
        "A brown dog lies on a green sofa.\nA dog resting on a couch."


def test_coco_unknown_category_is_an_error(coco):
    inst = json.loads(coco[1].read_text())
    inst["annotations"][0]["category_id"] = 777
    coco[1].write_text(json.dumps(inst))
    with pytest.raises(ContextError, match="777"):
        load_coco(*coco)


def test_simple_jsonl_format(tmp_path):
    path = tmp_path / "images.jsonl"
    rows = [{"image": "a/1.jpg", "id": "1", "width": 640, "height": 480,
             "captions": ["A brown dog lies on a green sofa.", "A dog resting on a couch."],
             "objects": [{"category": "dog", "box": [64, 48, 256, 288]}, {"category": "couch", "box": [0, 240, 640, 480]}]},
            {"image": "a/3.jpg", "captions": ["A red apple on a white plate.", "An apple on a plate."]},
            {"image": "a/9.jpg", "captions": []}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    contexts = load_simple(path)
    assert [(c.image_id, c.file_name, c.text()) for c in contexts.images] == [
        ("1", "a/1.jpg", CONTEXT["1"]), ("a/3.jpg", "a/3.jpg", CONTEXT["3"])]
    assert dict(contexts.skipped) == {"image without captions": 1}
    path.write_text("\n".join(json.dumps(r) for r in rows[:2] + rows[1:2]) + "\n")
    with pytest.raises(ContextError, match="listed twice"):
        load_simple(path)


# ------------------------------------------------------------------------------- parsing
def test_reply_parsing_accepts_and_rejects_with_reasons():
    sets = load_prompt_sets()
    conv, detail, complex_ = sets["conversation"], sets["detail"], sets["complex_reasoning"]
    assert parse_reply(conv, "Question: What is it?\nAnswer: A cat.\n\n**Question 2:** Where?\nAnswer: On a sofa,\n"
                             "next to a lamp.") == [("What is it?", "A cat."), ("Where?", "On a sofa,\nnext to a lamp.")]
    cases = [
        (conv, "", "empty reply"),
        (conv, "Just a cat.", "no question/answer pairs"),
        (conv, "Here you go:\nQuestion: A?\nAnswer: B.\nQuestion: C?\nAnswer: D.", "text before the first question"),
        (conv, "Question: A?\nQuestion: C?\nAnswer: D.", "question without an answer"),
        (conv, "Question: A?\nAnswer: B.\nAnswer: D.", "answer without a question"),
        (conv, "Question: A?\nAnswer: B.\nQuestion: a?\nAnswer: D.", "repeated question"),
        (conv, "Question: A?\nAnswer: B.", "1 rounds (expected 2-8)"),
        (conv, "Question: A?\nAnswer: <image> B.\nQuestion: C?\nAnswer: D.", "<image> in the reply"),
        (conv, "Question: A?\nAnswer: At [0.12, 0.5, 0.3, 0.9].\nQuestion: C?\nAnswer: D.", "box coordinates in the reply"),
        (conv, "Question: A?\nAnswer: The bounding box shows it.\nQuestion: C?\nAnswer: D.", "reject phrase 'bounding box'"),
        (complex_, "Question: A?\nAnswer: B.\nQuestion: C?\nAnswer: D.", "2 rounds (expected 1-1)"),
        (detail, "A cat on a sofa.", "shorter than 40 words"),
        (detail, "Question: what? " + DESCRIPTION, "reject phrase 'question:'"),
    ]
    for ps, reply, reason in cases:
        with pytest.raises(Rejected) as err:
            parse_reply(ps, reply)
        assert err.value.reason == reason, reply
    assert parse_reply(detail, DESCRIPTION) == [(None, DESCRIPTION)]


def test_shipped_prompt_sets_are_complete():
    for kind in KINDS:
        raw = RAW[kind]
        assert raw["kind"] == kind and isinstance(raw["version"], int)
        assert raw["system"].strip() and len(raw["examples"]) >= 2
    assert len(RAW["detail"]["instructions"]) >= 10
    sets = load_prompt_sets()  # every few-shot response parses under its own rules
    assert set(sets) == set(KINDS)


def test_split_total_and_strict_mix():
    assert split_total(158000, {"conversation": 58, "detail": 23, "complex_reasoning": 77}) == {
        "conversation": 58000, "detail": 23000, "complex_reasoning": 77000}
    assert sum(split_total(10, {"conversation": 1, "detail": 1, "complex_reasoning": 1}).values()) == 10
    records = [{"kind": k, "n": i} for i, k in enumerate(["conversation"] * 4 + ["detail"] + ["complex_reasoning"] * 2)]
    kept = select_mix(records, {"conversation": 2, "detail": 1, "complex_reasoning": 1}, strict=True)
    assert [r["n"] for r in kept] == [0, 1, 4, 5]  # 2 : 1 : 1, the first ones of each kind
    assert select_mix(records, {"conversation": 2, "detail": 1, "complex_reasoning": 1}, strict=False) == records


# ------------------------------------------------------------------------------- end to end
def test_generate_parse_dedup_report_and_resume(coco, server, tmp_path):
    out = tmp_path / "out"
    report = gen_main(gen_args(coco, out, server, "--concurrency", "4"))
    assert len(server.requests) == 12 and server.max_in_flight > 1  # concurrent requests
    first = next(r for r in server.requests
                 if r["body"]["messages"][0]["content"] == RAW["conversation"]["system"].rstrip("\n")
                 and r["body"]["messages"][-1]["content"] == CONTEXT["1"])
    assert first["path"] == "/v1/chat/completions" and first["auth"] == "Bearer sk-test"
    assert first["body"]["model"] == "fake-llm"
    assert first["body"]["temperature"] == RAW["conversation"]["temperature"]
    assert first["body"]["max_tokens"] == RAW["conversation"]["max_tokens"]
    expected = [{"role": "system", "content": RAW["conversation"]["system"].rstrip("\n")}]
    for ex in RAW["conversation"]["examples"]:
        expected += [{"role": "user", "content": ex["context"]}, {"role": "assistant", "content": ex["response"]}]
    assert first["body"]["messages"] == expected + [{"role": "user", "content": CONTEXT["1"]}]

    data = json.loads((out / "instruct.json").read_text())
    assert sorted(r["id"] for r in data) == ["1-conversation", "1-detail", "2-complex_reasoning",
                                             "4-complex_reasoning", "4-conversation", "4-detail"]
    by_id = {r["id"]: r for r in data}
    assert by_id["1-conversation"] == {
        "id": "1-conversation", "image": "coco/train2017/000000000001.jpg", "kind": "conversation",
        "conversations": [{"from": "human", "value": "<image>\n" + LONG_Q}, {"from": "gpt", "value": LONG_A},
                          {"from": "human", "value": "Is it sleeping?"}, {"from": "gpt", "value": "Almost."}]}
    detail_q = by_id["4-detail"]["conversations"][0]["value"]
    assert detail_q.startswith("<image>\n") and detail_q[len("<image>\n"):] in RAW["detail"]["instructions"]
    assert by_id["4-detail"]["conversations"][1]["value"] == CAT_DESCRIPTION
    template = get_template("vicuna_v1")
    for r in data:  # valid LLaVA structure: one <image>, in the first human turn
        template.render(r["conversations"], num_images=1, sample_id=r["id"])
        assert r["conversations"][0]["value"].startswith("<image>\n")
        assert all("<image>" not in t["value"] for t in r["conversations"][1:])
    assert len(json.loads((out / "complex_reasoning.json").read_text())) == 2

    kinds = report["kinds"]
    assert {k: (v["requested"], v["new_requests"], v["accepted"], v["in_output"]) for k, v in kinds.items()} == {
        "conversation": (4, 4, 2, 2), "detail": (4, 4, 2, 2), "complex_reasoning": (4, 4, 3, 2)}
    assert kinds["conversation"]["rejected"] == {"text before the first question": 1, "box coordinates in the reply": 1}
    assert kinds["detail"]["rejected"] == {"shorter than 40 words": 1, "reject phrase 'caption'": 1}
    assert kinds["complex_reasoning"]["rejected"] == {"2 rounds (expected 1-1)": 1}
    assert kinds["complex_reasoning"]["duplicates"] == {"exact": 0, "near": 1}
    assert report["tokens"]["this_run"] == {"prompt": 1200, "completion": 240, "unreported": 0}
    assert report["cost_usd"]["this_run"] == pytest.approx((1200 * 2.0 + 240 * 10.0) / 1e6)
    assert report["inputs"]["skipped"]["image without captions"] == 1
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert {r["id"]: r["reason"] for r in rejected}["1-complex_reasoning"] == "near duplicate of 1-conversation"
    assert len(rejected) == 6
    assert json.loads((out / "report.json").read_text()) == report

    # a re-run pays nothing and writes the same files
    before = {p.name: p.read_bytes() for p in out.glob("*.json")}
    again = gen_main(gen_args(coco, out, server))
    assert len(server.requests) == 12
    assert again["tokens"]["this_run"]["prompt"] == 0 and again["cost_usd"]["all"] == report["cost_usd"]["all"]
    assert {p.name: p.read_bytes() for p in out.glob("*.json") if p.name != "report.json"} == \
        {k: v for k, v in before.items() if k != "report.json"}

    # a crash mid-write: three replies lost, the last line cut; only those three are asked again
    lines = (out / "cache.jsonl").read_text().splitlines(keepends=True)
    (out / "cache.jsonl").write_text("".join(lines[:9]) + lines[9][:25])
    third = gen_main(gen_args(coco, out, server))
    assert len(server.requests) == 15
    assert sum(k["cached_before"] for k in third["kinds"].values()) == 9
    assert (out / "instruct.json").read_bytes() == before["instruct.json"]
    assert len((out / "cache.jsonl").read_text().splitlines()) == 12


def test_error_mid_run_keeps_replies_and_resumes(coco, server, tmp_path):
    out = tmp_path / "out"
    server.respond = lambda body: (401, "Incorrect API key") if len(server.requests) >= 5 else scripted(body)
    with pytest.raises(SystemExit) as err:
        gen_main(gen_args(coco, out, server, "--concurrency", "1"))
    message = str(err.value)
    assert "401" in message and "Incorrect API key" in message and "run the same command again" in message
    assert len(server.requests) == 5  # a 401 is not retried
    assert len((out / "cache.jsonl").read_text().splitlines()) == 4
    server.respond = scripted
    report = gen_main(gen_args(coco, out, server))
    assert len(server.requests) == 5 + 8
    assert sum(k["in_output"] for k in report["kinds"].values()) == 6


def test_prompt_edit_needs_a_version_bump(coco, server, tmp_path):
    prompts = tmp_path / "prompts"
    shutil.copytree(PROMPTS, prompts)
    out = tmp_path / "out"
    gen_main(gen_args(coco, out, server, "--prompts-dir", str(prompts)))
    assert len(server.requests) == 12
    detail = (prompts / "detail.yaml").read_text()
    (prompts / "detail.yaml").write_text(detail.replace("Write plain prose", "Be precise. Write plain prose"))
    with pytest.raises(SystemExit, match="bump"):
        gen_main(gen_args(coco, out, server, "--prompts-dir", str(prompts)))
    assert len(server.requests) == 12
    (prompts / "detail.yaml").write_text((prompts / "detail.yaml").read_text().replace("version: 1", "version: 2"))
    server.respond = lambda body: (200, REPLIES[("detail", FIRST_LINE[body["messages"][-1]["content"].split("\n")[0]])])
    report = gen_main(gen_args(coco, out, server, "--prompts-dir", str(prompts)))
    assert len(server.requests) == 16  # only the four detail replies are new
    assert report["prompt_sets"]["detail"] == "detail/v2"
    assert {k: v["new_requests"] for k, v in report["kinds"].items()} == {
        "conversation": 0, "detail": 4, "complex_reasoning": 0}


def test_too_many_requests_per_kind_is_an_error(coco, server, tmp_path):
    args = gen_args(coco, tmp_path / "out", server)
    args[args.index("--total") + 1] = "13"  # 5 of one kind for 4 images
    with pytest.raises(SystemExit, match="at most one request per kind"):
        gen_main(args)
    assert server.requests == []


# ------------------------------------------------------------------------------- the client
def test_client_rate_limit_spaces_requests_and_counts_usage(server):
    sleeps = []
    client = ChatClient(server.url, "fake-llm", requests_per_minute=60, sleep=sleeps.append, clock=lambda: 100.0)
    server.respond = lambda body: (200, "ok")
    for _ in range(3):
        reply = client.complete([{"role": "user", "content": "hi"}], 0.0, 5)
    assert sleeps == [1.0, 2.0]  # a frozen clock: starts at 100, 101, 102
    assert (reply.text, reply.prompt_tokens, reply.completion_tokens) == ("ok", 100, 20)
    assert (client.n_requests, client.prompt_tokens, client.completion_tokens) == (3, 300, 60)
    server.usage = None
    assert client.complete([{"role": "user", "content": "hi"}], 0.0, 5).prompt_tokens is None
