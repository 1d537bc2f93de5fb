"""The LLaVA-protocol inference runner: prompts as the reference writes them, batching, resume, chunks."""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from llava_sft.config import from_dict
from llava_sft.eval.run_vqa import (
    answer_items,
    get_chunk,
    load_mmbench,
    load_scienceqa,
    load_vqa,
    main,
    merge_answers,
    stamp_file,
)
from llava_sft.model.llava import LlavaModel, ModelConfig, load_tokenizer
from tests.tiny import model_dict

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "eval_fixtures"
needs_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"LLaVA eval fixtures not found at {FIXTURES}")


@pytest.fixture(scope="module")
def model_dir(llama_tokenizer_dir, tmp_path_factory) -> Path:
    import torch

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("model")
    tokenizer = load_tokenizer(str(llama_tokenizer_dir))
    cfg = model_dict(llama_tokenizer_dir)
    cfg["llm"]["config"]["vocab_size"] = len(tokenizer)
    LlavaModel(from_dict(ModelConfig, cfg)).save_pretrained(out, tokenizer, {"template": "vicuna_v1"})
    return out


@pytest.fixture(scope="module")
def questions(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vqa")
    (root / "images").mkdir()
    rows = []
    for i, color in enumerate(["red", "blue", "green", "yellow", "purple", "orange", "white"]):
        Image.new("RGB", (40 + 7 * i, 30), color).save(root / "images" / f"{i}.png")
        rows.append({"question_id": 100 + i, "image": f"{i}.png", "text": f"What color is this? {i}", "category": "c"})
    (root / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def run(model_dir, questions, answers, *extra):
    main(["--model", str(model_dir), "--questions", str(questions / "q.jsonl"), "--image-folder",
          str(questions / "images"), "--answers", str(answers), "--max-new-tokens", "6", "--device", "cpu", *extra])
    return [json.loads(line) for line in answers.read_text().splitlines()]


def test_batched_equals_unbatched_and_rows_follow_the_answer_format(model_dir, questions, tmp_path):
    one = run(model_dir, questions, tmp_path / "b1.jsonl", "--batch-size", "1")
    four = run(model_dir, questions, tmp_path / "b4.jsonl", "--batch-size", "4")
    assert [r["text"] for r in one] == [r["text"] for r in four]
    assert [r["question_id"] for r in one] == list(range(100, 107))
    assert set(one[0]) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
    assert one[0]["prompt"] == "What color is this? 0" and one[0]["model_id"] == model_dir.name
    assert len({r["answer_id"] for r in one}) == 7


def test_an_interrupted_run_continues_without_redoing_answers(model_dir, questions, tmp_path):
    full = run(model_dir, questions, tmp_path / "full.jsonl", "--batch-size", "3")
    partial = tmp_path / "partial.jsonl"
    partial.write_text("".join(json.dumps(r) + "\n" for r in full[:3]))  # killed after the first batch
    stamp_file(partial).write_text(stamp_file(tmp_path / "full.jsonl").read_text())  # written before answering
    rows = run(model_dir, questions, partial, "--batch-size", "3")
    assert rows[:3] == full[:3]  # untouched, not re-answered (answer_ids kept)
    assert [r["question_id"] for r in rows] == [r["question_id"] for r in full]
    assert [r["text"] for r in rows] == [r["text"] for r in full]


def test_chunks_merge_back_into_the_unsharded_answers(model_dir, questions, tmp_path):
    full = run(model_dir, questions, tmp_path / "full.jsonl")
    chunks = [tmp_path / f"chunk_{k}.jsonl" for k in range(3)]
    for k, chunk in enumerate(chunks):
        run(model_dir, questions, chunk, "--num-chunks", "3", "--chunk-idx", str(k))
    assert [len(c.read_text().splitlines()) for c in chunks] == [3, 3, 1]  # ceil-sized, as LLaVA splits
    merge_answers(tmp_path / "merged.jsonl", chunks)
    merged = [json.loads(line) for line in (tmp_path / "merged.jsonl").read_text().splitlines()]
    assert [(r["question_id"], r["text"]) for r in merged] == [(r["question_id"], r["text"]) for r in full]
    assert get_chunk(list(range(10)), 4, 3) == [9] and get_chunk(list(range(10)), 4, 0) == [0, 1, 2]


@needs_fixtures
def test_scienceqa_prompts_are_the_official_ones():
    items = load_scienceqa(FIXTURES / "scienceqa" / "llava_test_CQM-A.json", Path("images"))
    official = [json.loads(line) for line in
                (FIXTURES / "scienceqa" / "answers" / "llava-v1.5-13b.jsonl").read_text().splitlines()]
    by_id = {str(r["question_id"]): r["prompt"] for r in official}
    assert len(items) == len(by_id) == 4241
    assert all(it["prompt"] == by_id[it["key"]] for it in items)
    assert sum(it["image"] is not None for it in items) == 2017  # text-only questions get no image


@needs_fixtures
@pytest.mark.parametrize("bench,questions,answers", [
    ("pope", "llava_pope_test.jsonl", "answers/llava-v1.5-13b.jsonl"),
    ("mme", "llava_mme.jsonl", "answers/llava-v1.5-13b.jsonl"),
    ("mm_vet", "llava-mm-vet.jsonl", "answers/llava-v1.5-13b.jsonl"),
])
def test_vqa_prompts_and_ids_are_the_official_ones(bench, questions, answers):
    items = load_vqa(FIXTURES / bench / questions, Path("images"))
    official = [json.loads(line) for line in (FIXTURES / bench / answers).read_text().splitlines()]
    assert [(it["question_id"], it["prompt"]) for it in items] == [(r["question_id"], r["prompt"]) for r in official]


def _png_b64(color) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_mmbench_rounds_rotate_the_options_under_fixed_letters(tmp_path):
    tsv = tmp_path / "mmbench.tsv"
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"]
    rows = [[7, "Which one?", "Look closely.", "cat", "dog", "cow", "", "B", "animals", _png_b64("red")],
            [8, "Pick", "nan", "yes", "no", "", "", "A", "misc", _png_b64("blue")]]
    tsv.write_text("\t".join(header) + "\n" + "".join("\t".join(map(str, r)) + "\n" for r in rows))
    items = load_mmbench(tsv)
    assert [it["key"] for it in items] == ["7/0", "7/1", "7/2", "8/0", "8/1"]
    assert items[0]["prompt"] == "Look closely.\nWhich one?\nA. cat\nB. dog\nC. cow"
    assert items[1]["prompt"] == "Look closely.\nWhich one?\nA. dog\nB. cow\nC. cat"
    assert items[1]["extra"] == {"round_id": 1, "options": ["dog", "cow", "cat"], "option_char": ["B", "C", "A"]}
    assert items[3]["prompt"] == "Pick\nA. yes\nB. no"  # "nan" hint = no hint
    assert items[0]["instruction"] == "Answer with the option's letter from the given choices directly."
    assert load_mmbench(tsv, lang="cn", all_rounds=False)[0]["instruction"] == "请直接回答选项字母。"
    assert len(load_mmbench(tsv, all_rounds=False)) == 2


def test_mmbench_rows_carry_round_and_options(model_dir, tmp_path):
    from llava_sft.generate import Answerer

    tsv = tmp_path / "mmbench.tsv"
    tsv.write_text("index\tquestion\thint\tA\tB\tcategory\timage\n" + f"3\tQ?\tnan\tx\ty\tc\t{_png_b64('red')}\n")
    out = tmp_path / "mmb.jsonl"
    assert answer_items(Answerer(model_dir, "cpu"), load_mmbench(tsv), out, max_new_tokens=3) == 2
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["question_id"], r["round_id"], r["options"]) for r in rows] == [(3, 0, ["x", "y"]), (3, 1, ["y", "x"])]
    assert answer_items(Answerer(model_dir, "cpu"), load_mmbench(tsv), out, max_new_tokens=3) == 0  # resumable


def test_answers_of_another_model_are_not_resumed(tmp_path):
    """Issue: results went to checkpoints/eval/$(basename MODEL) and answer files resume, so a second model whose folder
    was also named stage2 got the first one's POPE score (82.2 instead of 65.6) without a warning."""
    import json

    import pytest

    from llava_sft.eval.run_vqa import model_stamp

    def model(name: str, weights: bytes) -> Path:
        folder = tmp_path / name / "stage2"
        folder.mkdir(parents=True)
        (folder / "projector.safetensors").write_bytes(weights)
        (folder / "llava_config.json").write_text("{}")
        return folder

    first, second = model("a", b"\x01" * 100), model("b", b"\x02" * 100)
    assert model_stamp(first) != model_stamp(second)
    answers = tmp_path / "answers" / "pope.jsonl"

    class Answerer:
        model_id = "m"

        def answer(self, questions, images, **kw):
            return ["yes"] * len(questions)

    items = [{"key": "1", "question_id": 1, "prompt": "Is it?", "image": None, "extra": {}}]
    assert answer_items(Answerer(), items, answers, stamp=model_stamp(first)) == 1
    assert answer_items(Answerer(), items, answers, stamp=model_stamp(first)) == 0  # same model: resumed
    with pytest.raises(SystemExit, match=rf"made by {first}.*not {second}"):
        answer_items(Answerer(), items, answers, stamp=model_stamp(second))
    (first / "projector.safetensors").write_bytes(b"\x03" * 100)  # retrained in place
    with pytest.raises(SystemExit, match="holds answers made by"):
        answer_items(Answerer(), items, answers, stamp=model_stamp(first))
    merged = tmp_path / "merged.jsonl"
    merge_answers(merged, [answers])
    assert json.loads(stamp_file(merged).read_text())["model"] == str(first.resolve())
