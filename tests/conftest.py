"""Shared fixtures: small real tokenizers trained offline once per session, and a PNG writer.

Fixture names are distinct from the module-level fixtures of test_reference_compat.py
(`vicuna_tok`) and test_tokenizer_train.py (`llama_dir`, `llama_tok`, `llama3_tok`, `chatml_tok`).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from llava_sft.data.tokenizer_train import (
    demo_corpus,
    make_chatml_style_tokenizer,
    make_llama3_style_tokenizer,
    train_llama_tokenizer,
)
from llava_sft.model.llava import load_tokenizer

# Text used by the golden/bad-sample/inspect tests, added to the corpus so that it gets real pieces.
EXTRA_LINES = [
    "What is it?", "It is red.", "It is a cat.", "What color is it?", "Is it big?", "Yes, it is big.",
    "Compare the two images.", "The first one is red.", "The second one is blue.", "Hello!", "Hi there.",
    "How are you?", "I am fine.", "You are helpful.", "Describe the image.", "A small cat on a table.",
]


@pytest.fixture(scope="session")
def llama_tokenizer_dir(tmp_path_factory) -> Path:
    """Slow LlamaTokenizer (Vicuna-like, legacy=True, pad = unk) directory."""
    return train_llama_tokenizer(demo_corpus(400) + EXTRA_LINES, tmp_path_factory.mktemp("llama_tokenizer"))


@pytest.fixture(scope="session")
def llama_tokenizer(llama_tokenizer_dir):
    return load_tokenizer(str(llama_tokenizer_dir))


@pytest.fixture(scope="session")
def llama3_tokenizer(tmp_path_factory):
    """Byte-level BPE, BOS <|begin_of_text|> prepended, EOS <|eot_id|> (pad falls back to EOS)."""
    path = make_llama3_style_tokenizer(demo_corpus(400) + EXTRA_LINES, tmp_path_factory.mktemp("llama3_tokenizer"))
    return load_tokenizer(str(path), use_fast=True)


@pytest.fixture(scope="session")
def chatml_tokenizer(tmp_path_factory):
    """Byte-level BPE, no BOS, EOS <|im_end|>, pad <|endoftext|> (Qwen2-like)."""
    path = make_chatml_style_tokenizer(demo_corpus(400) + EXTRA_LINES, tmp_path_factory.mktemp("chatml_tokenizer"))
    return load_tokenizer(str(path), use_fast=True)


@pytest.fixture(autouse=True, scope="session")
def _startup_cache(tmp_path_factory):
    """The start-up check's cache (data/catalog.py) in this session's temporary directory, never in ~/.cache;
    subprocesses (CLI tests) inherit it."""
    os.environ["LLAVA_SFT_CACHE"] = str(tmp_path_factory.mktemp("llava_sft_cache"))
    yield
    os.environ.pop("LLAVA_SFT_CACHE", None)


def _write_pngs(folder, names, size=(40, 24)) -> list[Path]:
    """Write one small solid-colour RGB PNG per name into `folder` (sub-folders created)."""
    folder = Path(folder)
    paths = []
    for k, name in enumerate(names):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, ((40 * k) % 256, 120, 200)).save(path, format="PNG")
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def write_pngs():
    """`write_pngs(folder, ["a.png", ...], size=(w, h))` -> list of written paths."""
    return _write_pngs
