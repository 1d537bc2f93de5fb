"""data/sentencepiece_llama.py gives, from the SentencePiece model alone, the ids of transformers 4.x's slow
`LlamaTokenizer` (the reference LLaVA-1.5 tokenizer) -- legacy and non-legacy, with added tokens -- so that
transformers 5.x, which has no slow class, tokenizes as the reference did. The comparison needs the slow class,
so it runs on the 4.x (reproduction) stack; on 5.x, the golden and reference-compatibility tests check the
encoder's use."""
from __future__ import annotations

import pytest
import transformers
from tokenizers import AddedToken

from llava_sft.data.sentencepiece_llama import SlowLlamaEncoder, is_sentencepiece_llama
from llava_sft.data.tokenizer_train import VICUNA_SYSTEM

pytestmark = pytest.mark.latest_stack  # passes on constraints/latest.txt too (CI runs it there)

TEXTS = [
    "", " ", "  ", "\n", "Hello world", " leading space", "  two leading", "trailing ", "x  y\n\nz",
    "\u2581already an underline", "a\u2581b", "caf\u00e9 cr\u00e8me \u4e2d\u6587 \u2014 na\u00efve", "Zebra quokka XYZ 1234",
    "</s>", "</s>USER: hi", "</s> USER: hi", "a</s>b", "a </s> b", "<s>inside</s>", "</s></s>", "<unk> ok",
    "<image>\nWhat is it?", "Describe it. <image>", "<image> starts with a space after", "x<image><image>y",
    f"{VICUNA_SYSTEM} USER: <image>\nWhat is in the image? ASSISTANT: A red circle on the left.</s>"
    "USER: And the other one? ASSISTANT: A blue square.</s>",
]

needs_slow = pytest.mark.skipif(int(transformers.__version__.split(".")[0]) >= 5,
                                reason="transformers 5.x has no slow LlamaTokenizer to compare with")


@needs_slow
@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "non-legacy"])
@pytest.mark.parametrize("image_token", [None, "plain", "lstrip-rstrip"])
def test_encoder_gives_the_slow_tokenizers_ids(llama_tokenizer_dir, legacy, image_token):
    from transformers import LlamaTokenizer

    slow = LlamaTokenizer.from_pretrained(llama_tokenizer_dir, legacy=legacy)
    if image_token is not None:  # the export adds <image>; users add tokens of their own
        strip = image_token == "lstrip-rstrip"
        slow.add_tokens([AddedToken("<image>", special=True, normalized=False, lstrip=strip, rstrip=strip)])
    assert is_sentencepiece_llama(slow) and slow.legacy is legacy
    encoder = SlowLlamaEncoder.of(slow)
    for text in TEXTS:
        assert encoder(text) == slow(text, add_special_tokens=True)["input_ids"], text


@needs_slow
def test_the_texts_tell_legacy_from_non_legacy_and_the_slow_from_the_fast_tokenizer(llama_tokenizer_dir):
    """The comparison above is meaningful: on these texts the two modes differ, and so does the fast class."""
    from transformers import LlamaTokenizer, LlamaTokenizerFast

    legacy = LlamaTokenizer.from_pretrained(llama_tokenizer_dir, legacy=True)
    non_legacy = LlamaTokenizer.from_pretrained(llama_tokenizer_dir, legacy=False)
    assert any(legacy(t)["input_ids"] != non_legacy(t)["input_ids"] for t in TEXTS)
    fast = LlamaTokenizerFast.from_pretrained(llama_tokenizer_dir, legacy=False, from_slow=True)
    assert any(fast(t)["input_ids"] != legacy(t)["input_ids"] for t in TEXTS)


def test_byte_level_tokenizers_are_not_sentencepiece_llama(llama3_tokenizer):
    assert not is_sentencepiece_llama(llama3_tokenizer)


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "non-legacy"])
def test_a_saved_tokenizer_reloads_with_the_same_slow_ids(llama_tokenizer_dir, tmp_path, legacy):
    """transformers 5.x saves no tokenizer.model and drops `legacy` / `add_bos_token`; `save_tokenizer` keeps them,
    so a model directory tokenizes as it trained, on either stack."""
    import json

    from transformers import AutoTokenizer

    from llava_sft.data.sentencepiece_llama import save_tokenizer

    original = AutoTokenizer.from_pretrained(llama_tokenizer_dir, use_fast=False, legacy=legacy)
    save_tokenizer(original, tmp_path / "saved")
    assert (tmp_path / "saved" / "tokenizer.model").is_file()
    config = json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())
    assert config["legacy"] is legacy and config["add_bos_token"] is True
    assert not isinstance(config.get("extra_special_tokens"), list)  # 4.x reads only a dict there
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "saved", use_fast=False)
    for text in TEXTS:
        assert SlowLlamaEncoder.of(reloaded)(text) == SlowLlamaEncoder.of(original)(text), text


@needs_slow
def test_on_4x_the_slow_tokenizer_is_encoded_here_and_a_fast_one_by_itself(llama_tokenizer_dir, monkeypatch):
    """data/tokenize.py encodes a 4.x slow SentencePiece Llama tokenizer with this module (the same ids, 3.4x
    faster per conversation: the loader's main cost on the demo) and leaves a fast tokenizer, whose ids may differ
    (the test above), to itself."""
    from transformers import LlamaTokenizer, LlamaTokenizerFast

    from llava_sft.data.tokenize import _encode

    calls = []
    encode = SlowLlamaEncoder.__call__
    monkeypatch.setattr(SlowLlamaEncoder, "__call__", lambda self, text: calls.append(text) or encode(self, text))
    text = TEXTS[-1]
    slow = LlamaTokenizer.from_pretrained(llama_tokenizer_dir, legacy=True)
    assert _encode(slow, text) == slow(text)["input_ids"] and calls == [text]
    calls.clear()
    fast = LlamaTokenizerFast.from_pretrained(llama_tokenizer_dir, legacy=False, from_slow=True)
    assert _encode(fast, text) == fast(text)["input_ids"] and calls == []
