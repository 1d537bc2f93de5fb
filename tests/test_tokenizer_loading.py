"""Loading the tokenizers of real model directories: a `tokenizer.json`-only directory under the recipes'
`use_fast=False`, and the settings our transformers-5.x Llama encoder does not reproduce (refused, named)."""
from __future__ import annotations

import json
import logging

import pytest
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from llava_sft.data.sentencepiece_llama import SlowLlamaEncoder, UnreproducibleTokenizer
from llava_sft.model.llava import load_tokenizer

pytestmark = pytest.mark.latest_stack  # passes on constraints/latest.txt too (CI runs it there)


def test_a_tokenizer_json_only_directory_loads_its_fast_class_and_says_so(tmp_path, caplog):
    """Many current releases ship tokenizer.json alone, naming a class with a slow twin (GPT2Tokenizer): with
    use_fast=False transformers 4.57 raised "TypeError: expected str, bytes or os.PathLike object, not NoneType"."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.train_from_iterator(["hello world, this is a test of the tokenizer"] * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "GPT2Tokenizer"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("tokenizer")) == [
        "tokenizer.json", "tokenizer_config.json"]
    with caplog.at_level(logging.INFO, logger="llava_sft"):
        tok = load_tokenizer(str(tmp_path), use_fast=False)
    assert tok.is_fast
    assert tok("hello world", add_special_tokens=False)["input_ids"] == backend.encode("hello world").ids
    assert type(tok).__name__ in caplog.text  # the class it used is named


def test_settings_the_5x_llama_encoder_does_not_reproduce_are_refused_by_name(llama_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(llama_tokenizer_dir, use_fast=False)
    SlowLlamaEncoder.of(tok)  # the plain Vicuna-style tokenizer is reproduced
    tok.add_tokens([AddedToken("<region>", single_word=True)])
    with pytest.raises(UnreproducibleTokenizer, match=r"single_word=True \(<region>\).*constraints/repro.txt"):
        SlowLlamaEncoder.of(tok)
    split = AutoTokenizer.from_pretrained(llama_tokenizer_dir, use_fast=False, split_special_tokens=True)
    with pytest.raises(UnreproducibleTokenizer, match="split_special_tokens=True"):
        SlowLlamaEncoder.of(split)


@pytest.mark.skipif(int(__import__("transformers").__version__.split(".")[0]) >= 5,
                    reason="transformers 5.x has no slow LlamaTokenizer to fall back to (refused instead, above)")
def test_on_4x_a_setting_the_encoder_does_not_reproduce_leaves_the_slow_class_to_encode(llama_tokenizer_dir):
    from llava_sft.data.tokenize import tokenize_with_images

    tok = AutoTokenizer.from_pretrained(llama_tokenizer_dir, use_fast=False)
    tok.add_tokens([AddedToken("<region>", single_word=True)])
    text = "USER: a<region> b <region> c ASSISTANT:"
    assert tokenize_with_images(text, tok) == tok(text)["input_ids"]  # the slow class's own ids, no error


@pytest.mark.parametrize("where", ["chat_template.jinja", "tokenizer_config.json"])
def test_a_chat_template_in_either_file_reaches_the_auto_template(chatml_tokenizer, tmp_path, where):
    """Releases before transformers 4.43 keep the template in tokenizer_config.json, later ones in
    chat_template.jinja; both load, on both stacks, and `auto` renders with it."""
    from llava_sft.data.templates import get_template

    jinja = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
             "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    chatml_tokenizer.save_pretrained(tmp_path)
    for name in ("chat_template.jinja", "chat_template.json"):
        (tmp_path / name).unlink(missing_ok=True)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    if where == "tokenizer_config.json":
        config["chat_template"] = jinja
    else:
        (tmp_path / "chat_template.jinja").write_text(jinja)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(str(tmp_path), use_fast=True)
    assert tok.chat_template == jinja
    assert get_template("auto", tokenizer=tok).generation_prompt("Hi") == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
