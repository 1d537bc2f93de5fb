"""Golden tests for every chat template: hand-written renderings, token ids and loss masks.

Each case lists the expected rendering as (text, supervised) pieces, written by hand from the
template definitions (not computed by the library). For each case we check that
  * the template renders exactly these pieces (same text, same supervised/unsupervised split),
  * `tokenize_conversation` gives the ids of the whole text tokenized LLaVA-style
    (`tokenize_with_images`), with one -200 per image,
  * the supervised tokens, grouped into contiguous runs, spell exactly the supervised pieces,
    and every other position (system, user, headers, images, chatml's trailing "\\n") is -100.

Exact equality with the reference LLaVA for plain/vicuna_v1 is covered by test_reference_compat.py.
"""
from __future__ import annotations

import dataclasses
import re
from itertools import groupby

import pytest

from llava_sft.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava_sft.data.sentencepiece_llama import is_sentencepiece_llama
from llava_sft.data.templates import ChatTemplate, get_template, list_templates
from llava_sft.data.tokenize import tokenize_conversation, tokenize_prompt, tokenize_with_images

pytestmark = pytest.mark.latest_stack  # passes on constraints/latest.txt too (CI runs it there)


def human(value):
    return {"from": "human", "value": value}


def gpt(value):
    return {"from": "gpt", "value": value}


# ----------------------------------------------------------------------------- hand-written scaffolding
VICUNA_SYS = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
L3_USER = "<|start_header_id|>user<|end_header_id|>\n\n"
L3_ASSISTANT = "<|start_header_id|>assistant<|end_header_id|>\n\n"
EOT = "<|eot_id|>"
CM_SYS = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
CM_USER = "<|im_start|>user\n"
CM_ASSISTANT = "<|im_start|>assistant\n"
IM_END = "<|im_end|>"

# ----------------------------------------------------------------------------- conversations
CONV = {
    "image_first": [human("<image>\nWhat is it?"), gpt("It is red.")],
    "image_last": [human("What is it?\n<image>"), gpt("It is red.")],
    # LLaVA's preprocess_multimodal: remove the marker, strip, prepend "<image>\n" -> the double space stays.
    "image_middle": [human("What is <image> this?"), gpt("It is red.")],
    "multi_turn": [
        human("<image>\nWhat is it?"), gpt("It is a cat."),
        human("What color is it?"), gpt("It is red."),
        human("Is it big?"), gpt("Yes, it is big."),
    ],
    "text_only": [human("Hello!"), gpt("Hi there."), human("How are you?"), gpt("I am fine.")],
    "two_images": [
        human("<image>\nWhat is it?"), gpt("It is a cat."),
        human("Compare the two images. <image>"), gpt("The second one is blue."),
    ],
}

# (case id, template, tokenizer fixture, conversations, num_images, expected pieces)
CASES = [
    # ---------------------------------------------------------------- plain (Stage 1): human text dropped
    ("plain/image_first/llama", "plain", "llama_tokenizer",
     [human("<image>\nDescribe the image."), gpt("A small cat on a table.")], 1,
     [("<image>", False), ("A small cat on a table.\n", True)]),
    ("plain/image_last/llama", "plain", "llama_tokenizer",
     [human("Describe the image.\n<image>"), gpt("A small cat on a table.")], 1,
     [("<image>", False), ("A small cat on a table.\n", True)]),
    ("plain/image_first/chatml", "plain", "chatml_tokenizer",
     [human("<image>\nDescribe the image."), gpt("A small cat on a table.")], 1,
     [("<image>", False), ("A small cat on a table.\n", True)]),
    ("plain/two_images/llama", "plain", "llama_tokenizer",
     [human("<image>\n<image>\nCompare the two images."), gpt("The first one is red.")], 2,
     [("<image><image>", False), ("The first one is red.\n", True)]),
    # ---------------------------------------------------------------- vicuna_v1
    ("vicuna_v1/image_first", "vicuna_v1", "llama_tokenizer", CONV["image_first"], 1,
     [(VICUNA_SYS + " USER: <image>\nWhat is it? ASSISTANT:", False), (" It is red.</s>", True)]),
    ("vicuna_v1/image_last", "vicuna_v1", "llama_tokenizer", CONV["image_last"], 1,
     [(VICUNA_SYS + " USER: <image>\nWhat is it? ASSISTANT:", False), (" It is red.</s>", True)]),
    ("vicuna_v1/image_middle", "vicuna_v1", "llama_tokenizer", CONV["image_middle"], 1,
     [(VICUNA_SYS + " USER: <image>\nWhat is  this? ASSISTANT:", False), (" It is red.</s>", True)]),
    ("vicuna_v1/multi_turn", "vicuna_v1", "llama_tokenizer", CONV["multi_turn"], 1,
     [(VICUNA_SYS + " USER: <image>\nWhat is it? ASSISTANT:", False), (" It is a cat.</s>", True),
      ("USER: What color is it? ASSISTANT:", False), (" It is red.</s>", True),
      ("USER: Is it big? ASSISTANT:", False), (" Yes, it is big.</s>", True)]),
    ("vicuna_v1/text_only", "vicuna_v1", "llama_tokenizer", CONV["text_only"], 0,
     [(VICUNA_SYS + " USER: Hello! ASSISTANT:", False), (" Hi there.</s>", True),
      ("USER: How are you? ASSISTANT:", False), (" I am fine.</s>", True)]),
    ("vicuna_v1/two_images", "vicuna_v1", "llama_tokenizer", CONV["two_images"], 2,
     [(VICUNA_SYS + " USER: <image>\nWhat is it? ASSISTANT:", False), (" It is a cat.</s>", True),
      ("USER: <image>\nCompare the two images. ASSISTANT:", False), (" The second one is blue.</s>", True)]),
    # ---------------------------------------------------------------- llama3 (no default system prompt)
    ("llama3/image_first", "llama3", "llama3_tokenizer", CONV["image_first"], 1,
     [(L3_USER + "<image>\nWhat is it?" + EOT + L3_ASSISTANT, False), ("It is red." + EOT, True)]),
    ("llama3/image_last", "llama3", "llama3_tokenizer", CONV["image_last"], 1,
     [(L3_USER + "<image>\nWhat is it?" + EOT + L3_ASSISTANT, False), ("It is red." + EOT, True)]),
    ("llama3/image_middle", "llama3", "llama3_tokenizer", CONV["image_middle"], 1,
     [(L3_USER + "<image>\nWhat is  this?" + EOT + L3_ASSISTANT, False), ("It is red." + EOT, True)]),
    ("llama3/multi_turn", "llama3", "llama3_tokenizer", CONV["multi_turn"], 1,
     [(L3_USER + "<image>\nWhat is it?" + EOT + L3_ASSISTANT, False), ("It is a cat." + EOT, True),
      (L3_USER + "What color is it?" + EOT + L3_ASSISTANT, False), ("It is red." + EOT, True),
      (L3_USER + "Is it big?" + EOT + L3_ASSISTANT, False), ("Yes, it is big." + EOT, True)]),
    ("llama3/text_only", "llama3", "llama3_tokenizer", CONV["text_only"], 0,
     [(L3_USER + "Hello!" + EOT + L3_ASSISTANT, False), ("Hi there." + EOT, True),
      (L3_USER + "How are you?" + EOT + L3_ASSISTANT, False), ("I am fine." + EOT, True)]),
    ("llama3/two_images", "llama3", "llama3_tokenizer", CONV["two_images"], 2,
     [(L3_USER + "<image>\nWhat is it?" + EOT + L3_ASSISTANT, False), ("It is a cat." + EOT, True),
      (L3_USER + "<image>\nCompare the two images." + EOT + L3_ASSISTANT, False),
      ("The second one is blue." + EOT, True)]),
    # ---------------------------------------------------------------- chatml (default system prompt; "\n" after <|im_end|> unsupervised)
    ("chatml/image_first", "chatml", "chatml_tokenizer", CONV["image_first"], 1,
     [(CM_SYS + CM_USER + "<image>\nWhat is it?" + IM_END + "\n" + CM_ASSISTANT, False),
      ("It is red." + IM_END, True), ("\n", False)]),
    ("chatml/image_last", "chatml", "chatml_tokenizer", CONV["image_last"], 1,
     [(CM_SYS + CM_USER + "<image>\nWhat is it?" + IM_END + "\n" + CM_ASSISTANT, False),
      ("It is red." + IM_END, True), ("\n", False)]),
    ("chatml/image_middle", "chatml", "chatml_tokenizer", CONV["image_middle"], 1,
     [(CM_SYS + CM_USER + "<image>\nWhat is  this?" + IM_END + "\n" + CM_ASSISTANT, False),
      ("It is red." + IM_END, True), ("\n", False)]),
    ("chatml/multi_turn", "chatml", "chatml_tokenizer", CONV["multi_turn"], 1,
     [(CM_SYS + CM_USER + "<image>\nWhat is it?" + IM_END + "\n" + CM_ASSISTANT, False),
      ("It is a cat." + IM_END, True),
      ("\n" + CM_USER + "What color is it?" + IM_END + "\n" + CM_ASSISTANT, False), ("It is red." + IM_END, True),
      ("\n" + CM_USER + "Is it big?" + IM_END + "\n" + CM_ASSISTANT, False), ("Yes, it is big." + IM_END, True),
      ("\n", False)]),
    ("chatml/text_only", "chatml", "chatml_tokenizer", CONV["text_only"], 0,
     [(CM_SYS + CM_USER + "Hello!" + IM_END + "\n" + CM_ASSISTANT, False), ("Hi there." + IM_END, True),
      ("\n" + CM_USER + "How are you?" + IM_END + "\n" + CM_ASSISTANT, False), ("I am fine." + IM_END, True),
      ("\n", False)]),
    ("chatml/two_images", "chatml", "chatml_tokenizer", CONV["two_images"], 2,
     [(CM_SYS + CM_USER + "<image>\nWhat is it?" + IM_END + "\n" + CM_ASSISTANT, False),
      ("It is a cat." + IM_END, True),
      ("\n" + CM_USER + "<image>\nCompare the two images." + IM_END + "\n" + CM_ASSISTANT, False),
      ("The second one is blue." + IM_END, True), ("\n", False)]),
]


def llama3_with_system() -> ChatTemplate:
    return dataclasses.replace(get_template("llama3"), system="You are helpful.")


# ----------------------------------------------------------------------------- helpers
def merge(pieces):
    """Join adjacent pieces with the same supervised flag (rendering is compared modulo splitting)."""
    return [("".join(t for t, _ in group), flag) for flag, group in groupby(pieces, key=lambda p: p[1])]


def supervised_runs(ids, labels):
    runs, cur = [], []
    for token, label in zip(ids, labels, strict=True):
        if label == IGNORE_INDEX:
            if cur:
                runs.append(cur)
            cur = []
        else:
            cur.append(token)
    return runs + ([cur] if cur else [])


def surface(tok, ids) -> str:
    """The exact text a run of token ids stands for.

    Byte-level tokenizers decode exactly. For a SentencePiece Llama tokenizer (the slow class on transformers
    4.x, the tokenizers-backed one on 5.x), `decode` drops a leading space, so the pieces are spelled out:
    "▁" -> " ", "<0xNN>" -> that byte.
    """
    if not is_sentencepiece_llama(tok):
        return tok.decode(ids, skip_special_tokens=False)
    out = b""
    for piece in tok.convert_ids_to_tokens(ids):
        byte = re.fullmatch(r"<0x([0-9A-F]{2})>", piece)
        out += bytes([int(byte.group(1), 16)]) if byte else piece.replace("\u2581", " ").encode()
    return out.decode("utf-8")


def expected_surface(tok, text_before: str, supervised_text: str) -> str:
    """SentencePiece (legacy Llama) adds its dummy-prefix "▁" to every chunk it tokenizes on its own;
    the text right after an `<image>` is such a chunk (as in the reference LLaVA's tokenizer_image_token)."""
    if is_sentencepiece_llama(tok) and (text_before == "" or text_before.endswith("<image>")):
        return " " + supervised_text
    return supervised_text


# ----------------------------------------------------------------------------- the golden tests
def _check_case(tok, template, conversations, num_images, pieces):
    full_text = "".join(text for text, _ in pieces)

    # 1. rendering: same text, same supervised split
    segments = template.render(conversations, num_images=num_images, sample_id="golden")
    assert "".join(s.text for s in segments) == full_text
    assert merge([(s.text, s.supervised) for s in segments]) == merge(pieces)

    ids, labels = tokenize_conversation(conversations, tok, template, num_images=num_images, sample_id="golden")
    ids, labels = list(ids), list(labels)

    # (a) ids = the whole hand-written text tokenized LLaVA-style, one -200 per image
    assert ids == tokenize_with_images(full_text, tok)
    assert ids.count(IMAGE_TOKEN_INDEX) == num_images == full_text.count("<image>")
    assert len(labels) == len(ids)
    if tok.bos_token_id is not None:
        assert ids[0] == tok.bos_token_id and labels[0] == IGNORE_INDEX

    # (c) every label is either the token itself or -100; images are never supervised
    assert all(label in (token, IGNORE_INDEX) for token, label in zip(ids, labels, strict=True))
    assert all(label == IGNORE_INDEX for token, label in zip(ids, labels, strict=True) if token == IMAGE_TOKEN_INDEX)

    # (b) the supervised runs spell exactly the supervised pieces, in order (so all the rest is -100)
    expected, before = [], ""
    for text, flag in merge(pieces):
        if flag:
            expected.append(expected_surface(tok, before, text))
        before += text
    runs = supervised_runs(ids, labels)
    assert [surface(tok, run) for run in runs] == expected
    return ids, labels


@pytest.mark.parametrize("case_id,template_name,tok_fixture,conversations,num_images,pieces", CASES,
                         ids=[c[0] for c in CASES])
def test_golden(request, case_id, template_name, tok_fixture, conversations, num_images, pieces):
    tok = request.getfixturevalue(tok_fixture)
    _check_case(tok, get_template(template_name), conversations, num_images, pieces)


def test_golden_llama3_with_system_prompt(llama3_tokenizer):
    pieces = [
        ("<|start_header_id|>system<|end_header_id|>\n\nYou are helpful." + EOT
         + L3_USER + "<image>\nWhat is it?" + EOT + L3_ASSISTANT, False),
        ("It is a cat." + EOT, True),
        (L3_USER + "What color is it?" + EOT + L3_ASSISTANT, False),
        ("It is red." + EOT, True),
    ]
    conv = [human("What is it? <image>"), gpt("It is a cat."), human("What color is it?"), gpt("It is red.")]
    ids, _ = _check_case(llama3_tokenizer, llama3_with_system(), conv, 1, pieces)
    # exactly one BOS (the tokenizer's), followed by the system header
    assert ids.count(llama3_tokenizer.bos_token_id) == 1
    assert ids[1] == llama3_tokenizer.convert_tokens_to_ids("<|start_header_id|>")


def test_golden_chatml_eos_and_newline_tokens(chatml_tokenizer):
    """The reply's <|im_end|> is supervised (the model must learn to stop); the "\\n" after it is not."""
    tok = chatml_tokenizer
    ids, labels = tokenize_conversation(CONV["image_first"], tok, get_template("chatml"), num_images=1)
    im_end = tok.convert_tokens_to_ids(IM_END)
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    assert newline and len(newline) == 1
    last_sup = max(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    assert labels[last_sup] == im_end
    assert ids[last_sup + 1:] == newline and labels[last_sup + 1:] == [IGNORE_INDEX]
    # the user's and the system's <|im_end|> are not supervised
    assert [labels[i] for i, t in enumerate(ids) if t == im_end] == [IGNORE_INDEX, IGNORE_INDEX, im_end]


def test_golden_vicuna_eos_is_supervised_single_token(llama_tokenizer):
    tok = llama_tokenizer
    ids, labels = tokenize_conversation(CONV["multi_turn"], tok, get_template("vicuna_v1"), num_images=1)
    eos_positions = [i for i, t in enumerate(ids) if t == tok.eos_token_id]
    assert len(eos_positions) == 3
    assert all(labels[i] == tok.eos_token_id for i in eos_positions)
    # supervision starts right after "ASSISTANT:" each time
    toks = tok.convert_ids_to_tokens([max(t, 0) for t in ids])
    starts = [i for i in range(1, len(labels)) if labels[i] != IGNORE_INDEX and labels[i - 1] == IGNORE_INDEX]
    assert [toks[i - 2:i] for i in starts] == [["\u2581ASSISTANT", ":"]] * 3


def test_templates_known():
    assert {"plain", "vicuna_v1", "llama3", "chatml"} <= set(list_templates())
    assert get_template("llama3").stop_strings == (EOT,)
    assert get_template("chatml").stop_strings == (IM_END,)
    assert get_template("vicuna_v1").stop_strings == ("</s>",)


# ----------------------------------------------------------------------------- generation prompts
GENERATION_GOLDEN = [
    ("plain", "<image>\nWhat is it?", "<image>"),
    ("vicuna_v1", "<image>\nWhat is it?", VICUNA_SYS + " USER: <image>\nWhat is it? ASSISTANT:"),
    ("vicuna_v1", "What is it? <image>", VICUNA_SYS + " USER: <image>\nWhat is it? ASSISTANT:"),
    ("vicuna_v1", "Hello!", VICUNA_SYS + " USER: Hello! ASSISTANT:"),
    ("llama3", "<image>\nWhat is it?", L3_USER + "<image>\nWhat is it?" + EOT + L3_ASSISTANT),
    ("chatml", "<image>\nWhat is it?", CM_SYS + CM_USER + "<image>\nWhat is it?" + IM_END + "\n" + CM_ASSISTANT),
]


@pytest.mark.parametrize("template_name,question,expected", GENERATION_GOLDEN)
def test_generation_prompt_golden(template_name, question, expected):
    assert get_template(template_name).generation_prompt(question) == expected


def test_generation_prompt_with_history_and_system():
    history = [("<image>\nWhat is it?", "It is a cat.")]
    assert get_template("vicuna_v1").generation_prompt("What color is it?", history) == (
        VICUNA_SYS + " USER: <image>\nWhat is it? ASSISTANT: It is a cat.</s>USER: What color is it? ASSISTANT:"
    )
    assert get_template("chatml").generation_prompt("What color is it?", history, system="Be brief.") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n" + CM_USER + "<image>\nWhat is it?" + IM_END + "\n"
        + CM_ASSISTANT + "It is a cat." + IM_END + "\n" + CM_USER + "What color is it?" + IM_END + "\n" + CM_ASSISTANT
    )
    # system="" switches the default system prompt off
    assert get_template("chatml").generation_prompt("Hi", system="") == CM_USER + "Hi" + IM_END + "\n" + CM_ASSISTANT
    assert get_template("llama3").generation_prompt("Hi", system="You are helpful.") == (
        "<|start_header_id|>system<|end_header_id|>\n\nYou are helpful." + EOT + L3_USER + "Hi" + EOT + L3_ASSISTANT
    )
    assert get_template("plain").generation_prompt("<image>\n<image>\nCompare.") == "<image><image>"


@pytest.mark.parametrize("template_name,tok_fixture", [
    ("vicuna_v1", "llama_tokenizer"), ("llama3", "llama3_tokenizer"), ("chatml", "chatml_tokenizer")])
def test_generation_prompt_is_training_prefix(request, template_name, tok_fixture):
    """At inference the model sees exactly the tokens it saw in training before its last reply."""
    tok = request.getfixturevalue(tok_fixture)
    template = get_template(template_name)
    conv = CONV["multi_turn"]
    history = [(conv[0]["value"], conv[1]["value"]), (conv[2]["value"], conv[3]["value"])]
    prompt = template.generation_prompt(conv[4]["value"], history)
    ids, labels = tokenize_conversation(conv, tok, template, num_images=1)
    prompt_ids = tokenize_prompt(prompt, tok)
    first_sup_of_last_reply = max(i for i in range(1, len(labels))
                                  if labels[i] != IGNORE_INDEX and labels[i - 1] == IGNORE_INDEX)
    assert ids[:first_sup_of_last_reply] == prompt_ids


def test_system_prompt_override_is_used_in_training_and_generation_prompts():
    """model.system_prompt replaces the template's default system prompt ("" removes it)."""
    from llava_sft.data.templates import get_template as get

    assert get("vicuna_v1", "").generation_prompt("Hi") == "USER: Hi ASSISTANT:"
    assert get("vicuna_v1", "Be brief.").generation_prompt("Hi") == "Be brief. USER: Hi ASSISTANT:"
    segments = get("vicuna_v1", "").render([{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}], 0)
    assert "".join(s.text for s in segments) == "USER: Hi ASSISTANT: Yo</s>"
    assert get("vicuna_v1").system.startswith("A chat between")  # the default is untouched


@pytest.mark.parametrize("template_name", ["vicuna_v1", "plain"])
def test_loss_on_all_supervises_every_text_token_and_keeps_the_ids(llama_tokenizer, template_name):
    """data.loss_on=all (the no-masking ablation): the same token ids, every one of them a label except the
    image placeholder (which splice turns into image positions, never supervised); the default stays LLaVA's."""
    tok = llama_tokenizer
    conv = CONV["multi_turn"] if template_name == "vicuna_v1" else [
        {"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": "A red circle."}]
    ids, labels = tokenize_conversation(conv, tok, get_template(template_name), num_images=1)
    all_ids, all_labels = tokenize_conversation(conv, tok, get_template(template_name, loss_on="all"), num_images=1)
    assert all_ids == ids
    assert ids.count(IMAGE_TOKEN_INDEX) == 1
    assert all_labels == [IGNORE_INDEX if t == IMAGE_TOKEN_INDEX else t for t in ids]
    assert sum(label != IGNORE_INDEX for label in labels) < len(ids) - 1  # the default masks the prompt
    with pytest.raises(ValueError, match="loss_on must be"):
        get_template(template_name, loss_on="prompt")
