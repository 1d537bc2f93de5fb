"""`python -m llava_sft.inspect`: JSONL of exactly what is trained on, supervised text shown in [[...]]."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from llava_sft.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava_sft.data.templates import get_template
from llava_sft.data.tokenize import tokenize_conversation
from llava_sft.inspect import inspect_file, render_supervision

REPO_ROOT = Path(__file__).resolve().parents[1]

RECORDS = [
    {"id": "img", "image": "a.png", "conversations": [
        {"from": "human", "value": "What is it?\n<image>"}, {"from": "gpt", "value": "It is red."}]},
    {"id": "txt", "conversations": [
        {"from": "human", "value": "Hello!"}, {"from": "gpt", "value": "Hi there."},
        {"from": "human", "value": "How are you?"}, {"from": "gpt", "value": "I am fine."}]},
    {"id": "bad", "conversations": [
        {"from": "human", "value": "Hello!"}, {"from": "gpt", "value": "Hi there."},
        {"from": "human", "value": "Anyone?"}]},
]


def run_inspect(*args):
    return subprocess.run([sys.executable, "-m", "llava_sft.inspect", *map(str, args)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("inspect") / "data.json"
    path.write_text(json.dumps(RECORDS))
    return path


@pytest.fixture(scope="module")
def cli_run(data_file, llama_tokenizer_dir):
    out = data_file.parent / "out.jsonl"
    proc = run_inspect("--data", data_file, "--tokenizer", llama_tokenizer_dir, "--template", "vicuna_v1", "--out", out)
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else None
    return proc, rows


def test_exit_code_1_because_of_bad_sample(cli_run):
    proc, _ = cli_run
    assert proc.returncode == 1, proc.stderr
    assert "1 bad sample(s)" in proc.stderr
    assert "'bad'" in proc.stderr and "odd number of turns" in proc.stderr


def test_jsonl_rows_equal_tokenize_conversation(cli_run, llama_tokenizer):
    _, rows = cli_run
    assert [row["id"] for row in rows] == ["img", "txt", "bad"]
    template = get_template("vicuna_v1")
    for row, record in zip(rows[:2], RECORDS[:2], strict=True):
        assert set(row) == {"id", "input_ids", "labels"}
        ids, labels = tokenize_conversation(record["conversations"], llama_tokenizer, template,
                                            num_images=1 if "image" in record else 0)
        assert row["input_ids"] == ids and row["labels"] == labels
    assert rows[0]["input_ids"].count(IMAGE_TOKEN_INDEX) == 1  # one placeholder, not expanded
    assert IMAGE_TOKEN_INDEX not in rows[1]["input_ids"]
    assert any(label != IGNORE_INDEX for label in rows[0]["labels"])


def test_bad_row_names_reason(cli_run):
    _, rows = cli_run
    assert set(rows[2]) == {"id", "error"}
    assert rows[2]["id"] == "bad" and rows[2]["error"].startswith("odd number of turns (3)")


def test_stdout_marks_supervised_text(cli_run):
    proc, _ = cli_run
    out = proc.stdout
    assert "--- img:" in out and "--- txt:" in out and "--- bad" not in out
    assert "USER: <image>" in out  # the image is shown as <image> in the rendered text
    # supervision starts right after "ASSISTANT:" (the slow tokenizer may decode the reply's leading space)
    assert re.search(r"ASSISTANT:\[\[ ?It is red\.</s>\]\]", out)
    assert re.search(r"ASSISTANT:\[\[ ?Hi there\.</s>\]\]USER: How are you\? ASSISTANT:\[\[ ?I am fine\.</s>\]\]", out)
    # the question is not supervised
    assert "[[What is it?" not in out and "What is it?" in out
    # one supervised run per reply: img has 1, txt has 2
    blocks = out.split("--- ")[1:]
    assert [block.count("[[") for block in blocks] == [1, 2]


def test_unknown_template_exit_code_2(data_file, llama_tokenizer_dir, tmp_path):
    out = tmp_path / "out.jsonl"
    proc = run_inspect("--data", data_file, "--tokenizer", llama_tokenizer_dir, "--template", "nope", "--out", out)
    assert proc.returncode == 2
    assert "unknown chat template 'nope'" in proc.stderr and "vicuna_v1" in proc.stderr
    assert not out.exists()


def test_inspect_file_max_length_applies_overlong_policy(data_file, llama_tokenizer, tmp_path):
    """In-process: --max-length counts each image as tokens_per_image tokens."""
    full = tokenize_conversation(RECORDS[0]["conversations"], llama_tokenizer, get_template("vicuna_v1"), num_images=1)[0]
    max_length = len(full) - 1 + 16 - 1  # one token too many for the image sample

    out = tmp_path / "drop.jsonl"
    problems = inspect_file(str(data_file), llama_tokenizer, "vicuna_v1", str(out), max_length=max_length,
                            tokens_per_image=16, overlong="drop", show=0)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["id"] == "img" and rows[0]["error"].startswith("overlong")
    assert problems["overlong"] == 1 and sum(problems.values()) == 2  # + the odd-turns sample

    out = tmp_path / "truncate.jsonl"
    inspect_file(str(data_file), llama_tokenizer, "vicuna_v1", str(out), max_length=max_length,
                 tokens_per_image=16, overlong="truncate", show=0)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["input_ids"] == full[:-1] and rows[0]["input_ids"].count(IMAGE_TOKEN_INDEX) == 1


def test_render_supervision_brackets(llama3_tokenizer):
    ids, labels = tokenize_conversation(RECORDS[0]["conversations"], llama3_tokenizer, get_template("llama3"),
                                        num_images=1)
    text = render_supervision(ids, labels, llama3_tokenizer)
    assert text == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat is it?<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n[[It is red.<|eot_id|>]]")
