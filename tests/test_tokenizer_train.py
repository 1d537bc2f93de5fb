"""Tests for llava_sft.data.tokenizer_train: the offline-trained tokenizers behave
like the real Vicuna (Llama-2), Llama-3 and Qwen2 (ChatML) tokenizers in the ways
the tokenization/masking code relies on."""

import pytest
from transformers import AutoTokenizer, LlamaTokenizer, LlamaTokenizerFast, PreTrainedTokenizerFast

from llava_sft.data.tokenizer_train import (
    VICUNA_SYSTEM,
    demo_corpus,
    make_chatml_style_tokenizer,
    make_llama3_style_tokenizer,
    train_bytelevel_tokenizer,
    train_llama_tokenizer,
)

pytestmark = pytest.mark.latest_stack  # passes on constraints/latest.txt too (CI runs it there)

ROUND_TRIP_TEXTS = [
    "A small cat on a table.",
    "There are 12 dogs in the park, and 3 birds!",
    "Line one.\nLine two: 3 + 4 = 7.",
    "café crème 中文 — naïve",  # contains characters that are (or are not) in the corpus
    "Zebra quokka XYZ",  # characters absent from the corpus -> byte fallback
]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return train_llama_tokenizer(demo_corpus(), tmp_path_factory.mktemp("llama_tok"), vocab_size=1000)


@pytest.fixture(scope="module")
def llama_tok(llama_dir):
    return AutoTokenizer.from_pretrained(llama_dir, use_fast=False, local_files_only=True)


def test_llama_files_and_class(llama_dir, llama_tok):
    assert (llama_dir / "tokenizer.model").is_file()
    assert (llama_dir / "tokenizer_config.json").is_file()
    assert type(llama_tok) is LlamaTokenizer
    assert llama_tok.legacy is True
    assert 300 < len(llama_tok) <= 1000


def test_llama_special_ids(llama_tok):
    assert (llama_tok.unk_token, llama_tok.unk_token_id) == ("<unk>", 0)
    assert (llama_tok.bos_token, llama_tok.bos_token_id) == ("<s>", 1)
    assert (llama_tok.eos_token, llama_tok.eos_token_id) == ("</s>", 2)
    assert llama_tok.pad_token == "<unk>" and llama_tok.pad_token_id == 0
    ids = llama_tok("hello").input_ids
    assert ids[0] == 1 and 2 not in ids  # BOS added, EOS not
    assert llama_tok("").input_ids == [1]


def test_llama_eos_in_text_is_single_special_id(llama_tok):
    ids = llama_tok("USER: hi ASSISTANT: yes</s>USER: next").input_ids
    assert ids.count(2) == 1
    toks = llama_tok.convert_ids_to_tokens(ids)
    # legacy=True: the text after a special token gets the dummy prefix again.
    assert toks[ids.index(2) + 1] == "▁USER"


def test_llama_chat_words_are_pieces(llama_tok):
    vocab = llama_tok.get_vocab()
    for piece in ["▁USER", "▁ASSISTANT", ":", "."]:
        assert piece in vocab
    assert llama_tok.tokenize("ASSISTANT: ") == ["▁ASSISTANT", ":", "▁"]
    assert llama_tok.decode(llama_tok(VICUNA_SYSTEM).input_ids, skip_special_tokens=True) == VICUNA_SYSTEM


def test_llama_newline_uses_byte_fallback(llama_tok):
    assert llama_tok.tokenize("\n") == ["▁", "<0x0A>"]
    assert llama_tok.convert_tokens_to_ids("<0x0A>") == 13  # 3 specials + byte 0x0A, as in Llama
    assert llama_tok.tokenize("a\nb")[1] == "<0x0A>"


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_llama_round_trip(llama_tok, text):
    ids = llama_tok(text).input_ids
    assert 0 not in ids  # byte fallback: never <unk>
    assert llama_tok.decode(ids, skip_special_tokens=True) == text


def test_llama_fast_conversion_agrees(llama_dir, llama_tok):
    fast = AutoTokenizer.from_pretrained(llama_dir, local_files_only=True)
    assert isinstance(fast, LlamaTokenizerFast)
    for text in ROUND_TRIP_TEXTS + ["A chat. USER: <image>\nQ ASSISTANT: A</s>USER: more"]:
        assert fast(text).input_ids == llama_tok(text).input_ids


@pytest.fixture(scope="module")
def llama3_tok(tmp_path_factory):
    out = make_llama3_style_tokenizer(demo_corpus(), tmp_path_factory.mktemp("llama3_tok"))
    return AutoTokenizer.from_pretrained(out, local_files_only=True)


@pytest.fixture(scope="module")
def chatml_tok(tmp_path_factory):
    out = make_chatml_style_tokenizer(demo_corpus(), tmp_path_factory.mktemp("chatml_tok"))
    return AutoTokenizer.from_pretrained(out, local_files_only=True)


def test_llama3_style(llama3_tok):
    tok = llama3_tok
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert tok.bos_token == "<|begin_of_text|>" and tok.eos_token == "<|eot_id|>"
    assert tok.pad_token is None
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    assert tok.convert_tokens_to_ids(specials) == [0, 1, 2, 3, 4]
    assert tok("").input_ids == [tok.bos_token_id]
    ids = tok("<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>").input_ids
    assert ids[:2] == [0, 2] and ids[-1] == tok.eos_token_id and 3 in ids
    assert tok("hi", add_special_tokens=False).input_ids[0] != tok.bos_token_id
    assert len(tok("\n", add_special_tokens=False).input_ids) == 1


def test_chatml_style(chatml_tok):
    tok = chatml_tok
    assert tok.bos_token is None
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert tok("").input_ids == []
    ids = tok("<|im_start|>user\nhi<|im_end|>\n").input_ids
    assert ids[0] == 1 and ids.count(2) == 1 and len(ids) < 10
    assert tok("\n").input_ids == tok.convert_tokens_to_ids(["Ċ"])


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_bytelevel_round_trip(llama3_tok, chatml_tok, text):
    assert llama3_tok.decode(llama3_tok(text).input_ids, skip_special_tokens=True) == text
    assert chatml_tok.decode(chatml_tok(text).input_ids) == text


def test_bytelevel_rejects_unknown_special(tmp_path):
    with pytest.raises(ValueError):
        train_bytelevel_tokenizer(["x"], tmp_path, special_tokens=["<eos>"], bos_token="<bos>", eos_token="<eos>")


def test_too_small_a_vocabulary_is_refused_with_the_minimum_sentencepiece_needs(tmp_path, monkeypatch):
    import llava_sft.data.tokenizer_train as tt

    texts = ["a red circle on the left", "the blue square is big, 3 of them"]
    minimum = tt.minimum_llama_vocab_size(tt._training_lines(texts))
    with pytest.raises(ValueError, match=f"minimum of {minimum} .* at least {minimum}"):
        train_llama_tokenizer(texts, tmp_path / "a", vocab_size=minimum - 1)
    # The minimum is SentencePiece's own: without our check it refuses one piece less and accepts exactly it.
    monkeypatch.setattr(tt, "minimum_llama_vocab_size", lambda lines: 0)
    with pytest.raises(RuntimeError, match="smaller than required_chars"):
        train_llama_tokenizer(texts, tmp_path / "b", vocab_size=minimum - 1)
    train_llama_tokenizer(texts, tmp_path / "c", vocab_size=minimum)


def test_byte_level_vocabulary_below_its_alphabet_is_refused(tmp_path):
    with pytest.raises(ValueError, match="minimum of 258 .* at least 258"):
        train_bytelevel_tokenizer(["some text"], tmp_path, vocab_size=257, special_tokens=["<s>", "</s>"],
                                  bos_token="<s>", eos_token="</s>")
