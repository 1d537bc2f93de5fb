"""Our tokenization/masking must equal the reference LLaVA-1.5 preprocessing.

The reference is re-implemented in ``tests/reference_llava.py`` (the oracle).
First the oracle itself is checked on hand-checked examples (exact token strings
and mask boundaries); then ``llava_sft.data.tokenize.tokenize_conversation`` is
compared with it, input_ids AND labels, on a set of LLaVA records, with a real
Vicuna-like (Llama-2 SentencePiece, legacy) tokenizer trained offline.
"""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import transformers
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).parent))  # make the oracle importable with or without tests/__init__.py
from reference_llava import (  # noqa: E402
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    reference_preprocess,
    reference_preprocess_detailed,
    tokenizer_image_token,
)

from llava_sft.data.tokenizer_train import demo_corpus, train_llama_tokenizer  # noqa: E402

pytestmark = pytest.mark.latest_stack  # passes on constraints/latest.txt too (CI runs it there)

BOS, EOS = 1, 2


@pytest.fixture(scope="session")
def vicuna_tok(tmp_path_factory):
    """A slow, legacy LlamaTokenizer trained offline (Vicuna-like: pad = unk)."""
    out = train_llama_tokenizer(demo_corpus(400), tmp_path_factory.mktemp("vicuna_tok"), vocab_size=1000)
    return AutoTokenizer.from_pretrained(out, use_fast=False, local_files_only=True)


class SlowTokenizerCalls:
    """The reference's `tokenizer(text).input_ids` as under its own stack (transformers 4.x's slow class), for
    transformers 5.x, which has none: through the encoder that tests/test_sentencepiece_llama.py holds equal to
    the slow class on 4.x. Everything else is the wrapped tokenizer's."""

    def __init__(self, tokenizer):
        from llava_sft.data.sentencepiece_llama import SlowLlamaEncoder

        self._tokenizer, self._encoder = tokenizer, SlowLlamaEncoder.of(tokenizer)

    def __call__(self, text, max_length=None, truncation=False):
        ids = self._encoder(text)
        return SimpleNamespace(input_ids=ids[:max_length] if truncation and max_length else ids)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


@pytest.fixture(scope="session")
def reference_tok(vicuna_tok):
    """The tokenizer the reference oracle calls: the slow class itself on 4.x."""
    return SlowTokenizerCalls(vicuna_tok) if int(transformers.__version__.split(".")[0]) >= 5 else vicuna_tok


def human(value):
    return {"from": "human", "value": value}


def gpt(value):
    return {"from": "gpt", "value": value}


LONG_ROUNDS = [
    (f"Question {i}: what is the {thing} doing in the park?", f"The {thing} is playing, number {i * 7}.\nIt looks happy!")
    for i, thing in enumerate(["cat", "dog", "child", "bird", "horse", "man", "woman", "boat", "train", "bicycle"] * 2)
]

# (name, template, sample)
CASES = [
    ("plain_image_first", "plain", {"id": "p1", "image": "a.jpg", "conversations": [
        human("<image>\nDescribe the image briefly."), gpt("A small cat on a wooden table.")]}),
    # the caption is a chunk of its own after <image>: its leading space meets SentencePiece's dummy prefix
    # ("▁", "▁A" on the slow class; "▁A" on transformers 5.x's tokenizers-backed class)
    ("plain_caption_leading_space", "plain", {"id": "p3", "image": "a.jpg", "conversations": [
        human("<image>\nDescribe the image briefly."), gpt(" A small cat, with a space in front.")]}),
    ("plain_image_last", "plain", {"id": "p2", "image": "b.jpg", "conversations": [
        human("Render a clear and concise summary of the photo.\n<image>"), gpt("There are 3 dogs in the park, near the river.")]}),
    ("v1_image_first", "vicuna_v1", {"id": "v1", "image": "c.jpg", "conversations": [
        human("<image>\nWhat is in the image?"), gpt("A red car on the street.")]}),
    ("v1_image_last", "vicuna_v1", {"id": "v2", "image": "c.jpg", "conversations": [
        human("What color is the car?\n<image>"), gpt("The car is red.")]}),
    ("v1_image_middle", "vicuna_v1", {"id": "v3", "image": "c.jpg", "conversations": [
        human("What is <image> this?"), gpt("It is a bicycle.")]}),
    ("v1_multi_turn_image", "vicuna_v1", {"id": "v4", "image": "d.jpg", "conversations": [
        human("<image>\nHow many birds are there?"), gpt("There are 4 birds."),
        human("Where are they?"), gpt("They are under a tree, in a field."),
        human("Is there a horse in the picture?"), gpt("No.")]}),
    ("v1_text_only_multi_turn", "vicuna_v1", {"id": "t1", "conversations": [
        human("Hello! Who are you?"), gpt("I am a helpful assistant."),
        human("What is 3 + 4?"), gpt("3 + 4 = 7."),
        human("Thanks; bye!"), gpt("Bye (and good luck)!")]}),
    ("v1_tricky_answers", "vicuna_v1", {"id": "v5", "image": "e.jpg", "conversations": [
        human("  <image>\n  Describe the café menu.  "), gpt("Line one.\nLine two: 3 + 4 = 7.\n\n- 42% of 1,000 items; (maybe)!"),
        human(" What does the sign say? "), gpt(" The crème brûlée costs 5.50 €, and 中文 文字 appear. "),
        human("Any digits?\n"), gpt("Yes: 0123456789.\n")]}),
    ("v1_text_only_unicode", "vicuna_v1", {"id": "t2", "conversations": [
        human("Écris «中» please."), gpt("中 — é, ü, ñ; ok?")]}),
    ("v1_long", "vicuna_v1", {"id": "v6", "image": "f.jpg", "conversations": [
        m for k, (q, a) in enumerate(LONG_ROUNDS) for m in (human(("<image>\n" if k == 0 else "") + q), gpt(a))]}),
]
CASE_IDS = [c[0] for c in CASES]


def supervised_spans(labels):
    """Contiguous runs of supervised label ids."""
    spans, cur = [], []
    for label in labels:
        if label == IGNORE_INDEX:
            if cur:
                spans.append(cur)
            cur = []
        else:
            cur.append(label)
    return spans + ([cur] if cur else [])


def answers(sample):
    return [t["value"] for t in sample["conversations"] if t["from"] == "gpt"]


# --------------------------------------------------------------------------- the oracle itself


def test_oracle_tokenizer_image_token(reference_tok):
    tok = reference_tok
    assert tokenizer_image_token("<image>", tok) == [BOS, IMAGE_TOKEN_INDEX]
    ids = tokenizer_image_token("USER: <image>\nhi", tok)
    # chunk 1 ("\nhi") is tokenized on its own, so it gets the dummy-prefix "▁" again before the byte <0x0A>.
    assert ids[0] == BOS and ids.count(IMAGE_TOKEN_INDEX) == 1
    k = ids.index(IMAGE_TOKEN_INDEX)
    assert tok.convert_ids_to_tokens(ids[:k]) == ["<s>", "▁USER", ":", "▁"]
    assert tok.convert_ids_to_tokens(ids[k + 1 : k + 3]) == ["▁", "<0x0A>"]
    assert BOS not in ids[1:]


def test_oracle_plain_hand_checked(reference_tok):
    tok = reference_tok
    sample = {"id": "x", "image": "x.jpg", "conversations": [human("Describe.\n<image>"), gpt("A small cat on a table.")]}
    res = reference_preprocess_detailed(sample, tok, "plain")
    assert res.conversation == "<image>A small cat on a table.\n"
    assert tok.convert_ids_to_tokens(res.input_ids[2:]) == ["▁A", "▁small", "▁cat", "▁on", "▁a", "▁table", ".", "<0x0A>"]
    assert res.input_ids[:2] == [BOS, IMAGE_TOKEN_INDEX]
    assert res.labels == [IGNORE_INDEX, IGNORE_INDEX] + res.input_ids[2:]
    assert not res.mismatch


def test_oracle_vicuna_v1_hand_checked(reference_tok):
    tok = reference_tok
    sample = {"id": "y", "image": "y.jpg", "conversations": [
        human("Where is the cat?\n<image>"), gpt("A small cat in the park."), human("Is it happy?"), gpt("The cat looks happy.")]}
    res = reference_preprocess_detailed(sample, tok, "vicuna_v1")
    assert res.conversation == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\nWhere is the cat? ASSISTANT: "
        "A small cat in the park.</s>USER: Is it happy? ASSISTANT: The cat looks happy.</s>"
    )
    assert not res.mismatch
    toks = tok.convert_ids_to_tokens([t if t >= 0 else 0 for t in res.input_ids])
    spans = []  # (start, stop) of supervised runs
    for k, label in enumerate(res.labels):
        if label != IGNORE_INDEX and (k == 0 or res.labels[k - 1] == IGNORE_INDEX):
            spans.append([k, k])
        if label != IGNORE_INDEX:
            spans[-1][1] = k + 1
    assert len(spans) == 2
    assert [toks[a:b] for a, b in spans] == [
        ["▁A", "▁small", "▁cat", "▁in", "▁the", "▁park", ".", "</s>"],
        ["▁The", "▁cat", "▁looks", "▁happy", ".", "</s>"],
    ]
    for a, b in spans:
        assert toks[a - 2 : a] == ["▁ASSISTANT", ":"]  # supervision starts right after "ASSISTANT:"
        assert res.input_ids[b - 1] == EOS
        assert res.labels[a:b] == res.input_ids[a:b]
    # the second round's "USER" follows "</s>" with a dummy-prefix "▁" (legacy=True)
    assert toks[spans[0][1]] == "▁USER"
    assert res.input_ids.count(IMAGE_TOKEN_INDEX) == 1


def test_oracle_detects_mismatch(vicuna_tok):
    """The mismatch branch exists and masks everything (a fast tokenizer with
    legacy=False would trigger it; here we fake it with a wrong pad id)."""

    class ShiftedPad:
        def __init__(self, tok):
            self._tok, self.bos_token_id, self.pad_token_id = tok, tok.bos_token_id, tok.convert_tokens_to_ids("▁USER")

        def __call__(self, text, **kw):
            return self._tok(text, **kw)

    sample = {"id": "z", "conversations": [human("Hi"), gpt("Hello.")]}
    res = reference_preprocess_detailed(sample, ShiftedPad(vicuna_tok), "vicuna_v1")
    assert res.mismatch and set(res.labels) == {IGNORE_INDEX}


@pytest.mark.parametrize("name,template,sample", CASES, ids=CASE_IDS)
def test_oracle_cases_are_meaningful(reference_tok, name, template, sample):
    """On every comparison case the oracle supervises exactly the replies."""
    tok = reference_tok
    res = reference_preprocess_detailed(sample, tok, template)
    assert not res.mismatch
    assert res.input_ids.count(IMAGE_TOKEN_INDEX) == (1 if "image" in sample else 0)
    spans = supervised_spans(res.labels)
    replies = answers(sample)
    assert len(spans) == len(replies)
    for span, reply in zip(spans, replies, strict=True):
        if template == "plain":  # caption + "\n", no EOS in Stage 1
            assert tok.convert_ids_to_tokens(span[-1]) == "<0x0A>"
            assert tok.decode(span).strip() == reply.strip()
        else:
            assert span[-1] == EOS and EOS not in span[:-1]
            assert tok.decode(span[:-1]).strip() == reply.strip()
            assert tok.convert_ids_to_tokens(span[-1]) == "</s>"


# --------------------------------------------------------------------------- ours == reference


@pytest.mark.parametrize("name,template,sample", CASES, ids=CASE_IDS)
def test_matches_reference(vicuna_tok, reference_tok, name, template, sample):
    from llava_sft.data.templates import get_template
    from llava_sft.data.tokenize import tokenize_conversation

    ref_ids, ref_labels = reference_preprocess(sample, reference_tok, template)
    assert not reference_preprocess_detailed(sample, reference_tok, template).mismatch
    ids, labels = tokenize_conversation(
        sample["conversations"], vicuna_tok, get_template(template), has_image="image" in sample, sample_id=sample["id"]
    )
    assert list(ids) == ref_ids
    assert list(labels) == ref_labels
