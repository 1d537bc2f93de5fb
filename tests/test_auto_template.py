"""`data.template: auto` (data/auto_template.py): the tokenizer's own chat template, with loss on exactly the
assistant replies and their end-of-turn tokens, giving the ids of `apply_chat_template` and, where the template
marks `{% generation %}` spans, its assistant mask.

Templates written from the published ones (each model's tokenizer_config.json, the branches without tools):
Qwen2.5-Instruct (a default system prompt; here with `{% generation %}` spans added, as templates that support
`return_assistant_tokens_mask` have them), Qwen3 (no default system prompt; `</think>` blocks stripped from
assistant turns), Llama-3.1-Instruct (BOS, a dated system header, `| trim`), Mistral-Instruct v0.1 (no system role),
Llama-2-chat (BOS before every user turn, " " between `[/INST]` and the reply, `<<SYS>>` inside the first turn),
Gemma (google/gemma-7b-it: no system role, it raises; the assistant's role is "model"; `| trim`).
"""
from __future__ import annotations

import json

import pytest

from data_prep.make_shapes import generate as make_shapes
from llava_sft.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava_sft.data.templates import BadSampleError, get_template
from llava_sft.data.tokenize import tokenize_conversation
from llava_sft.data.tokenizer_train import demo_corpus, make_chatml_style_tokenizer, make_llama3_style_tokenizer
from llava_sft.model.llava import load_tokenizer
from tests.conftest import EXTRA_LINES
from tests.tiny import run_config

pytestmark = pytest.mark.latest_stack  # passes on constraints/latest.txt too (CI runs it there)

QWEN25 = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>assistant\\n' }}{% generation %}"
    "{{- message.content + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
QWEN3 = (
    "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}{%- set content = message.content %}"
    "{%- if '</think>' in content %}{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
LLAMA31 = (
    "{{- bos_token }}{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}{{- 'Cutting Knowledge Date: December 2023\\n' }}"
    "{{- 'Today Date: 26 Jul 2024\\n\\n' }}{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
    "message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token + ' ' }}{% endif %}{% endfor %}"
)
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)
CHAT = [{"from": "human", "value": "What is it?"}, {"from": "gpt", "value": "It is red."},
        {"from": "human", "value": "Is it big?"}, {"from": "gpt", "value": "Yes, it is big."}]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("auto")
    corpus = demo_corpus(400) + EXTRA_LINES
    return {"chatml": make_chatml_style_tokenizer(corpus, root / "chatml"),
            "llama3": make_llama3_style_tokenizer(corpus, root / "llama3")}


def tokenizer_with(dirs, family: str, jinja: str, tmp_path):
    tok = load_tokenizer(str(dirs[family]), use_fast=True)
    tok.chat_template = jinja
    tok.save_pretrained(tmp_path / family)
    return load_tokenizer(str(tmp_path / family), use_fast=True)


def hf_ids(tok, messages, **kw):
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)
    return [int(i) for i in out["input_ids"]], out


def messages(chat, system=None):
    return ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]} for t in chat]


def supervised_spans(tok, ids, labels) -> list[str]:
    spans, current = [], []
    for i, label in zip(ids, labels, strict=True):
        if label != IGNORE_INDEX:
            current.append(i)
        elif current:
            spans.append(tok.decode(current))
            current = []
    return spans + ([tok.decode(current)] if current else [])


def test_qwen25_ids_and_labels_are_apply_chat_templates_with_its_assistant_mask(dirs, tmp_path):
    tok = tokenizer_with(dirs, "chatml", QWEN25, tmp_path)
    for system, shown in ((None, "You are Qwen, created by Alibaba Cloud."), ("Be brief.", "system\nBe brief.")):
        ids, labels = tokenize_conversation(CHAT, tok, get_template("auto", system, tokenizer=tok), num_images=0)
        want, out = hf_ids(tok, messages(CHAT, system), return_assistant_tokens_mask=True)
        assert ids == want and shown in tok.decode(ids)  # the template's default, or the run's system prompt
        assert [int(label != IGNORE_INDEX) for label in labels] == list(out["assistant_masks"])
        assert sum(out["assistant_masks"]) > 0


@pytest.mark.parametrize("family,jinja", [("chatml", QWEN3), ("llama3", LLAMA31), ("chatml", MISTRAL)],
                         ids=["qwen3", "llama3.1", "mistral"])
def test_each_template_gives_apply_chat_templates_ids_and_supervises_replies_with_their_end_of_turn(
        dirs, tmp_path, family, jinja):
    tok = tokenizer_with(dirs, family, jinja, tmp_path)
    template = get_template("auto", tokenizer=tok)
    ids, labels = tokenize_conversation(CHAT, tok, template, num_images=0)
    assert ids == hf_ids(tok, messages(CHAT))[0]  # one BOS (the tokenizer's), where the template writes one too
    eot = template.stop_strings[0]
    assert eot in ("<|im_end|>", "<|eot_id|>")
    assert supervised_spans(tok, ids, labels) == [f"It is red.{eot}", f"Yes, it is big.{eot}"]
    text_only = tokenize_conversation(CHAT[:2], tok, template, num_images=0)
    assert text_only[0] == hf_ids(tok, messages(CHAT[:2]))[0]


def test_images_keep_llavas_placement_and_are_never_labels(dirs, tmp_path):
    tok = tokenizer_with(dirs, "chatml", QWEN25, tmp_path)
    template = get_template("auto", tokenizer=tok)
    chat = [{"from": "human", "value": "Compare <image> and <image>, please."}, {"from": "gpt", "value": "Same."}]
    ids, labels = tokenize_conversation(chat, tok, template, num_images=2)
    assert ids.count(IMAGE_TOKEN_INDEX) == 2 and all(lab != IMAGE_TOKEN_INDEX for lab in labels)
    text = template.generation_prompt("<image>\nWhat is it?")
    assert "<|im_start|>user\n<image>\nWhat is it?<|im_end|>\n<|im_start|>assistant\n" in text


def test_a_template_that_rewrites_a_reply_or_history_refuses_the_sample_naming_why(dirs, tmp_path):
    tok = tokenizer_with(dirs, "chatml", QWEN3, tmp_path)
    thinking = [{"from": "human", "value": "What is it?"}, {"from": "gpt", "value": "<think>red</think>It is red."}]
    with pytest.raises(BadSampleError, match="strips or rewrites it"):
        tokenize_conversation(thinking, tok, get_template("auto", tokenizer=tok), num_images=0, sample_id="t1")
    llama = tokenizer_with(dirs, "llama3", LLAMA31, tmp_path)
    padded = [{"from": "human", "value": "What is it?"}, {"from": "gpt", "value": "It is red. "}]  # `| trim`
    with pytest.raises(BadSampleError, match="span cannot be established"):
        tokenize_conversation(padded, llama, get_template("auto", tokenizer=llama), num_images=0)


def test_auto_without_a_chat_template_is_a_clear_error(dirs):
    tok = load_tokenizer(str(dirs["chatml"]), use_fast=True)
    with pytest.raises(ValueError, match="needs a tokenizer with a chat_template"):
        get_template("auto", tokenizer=tok)


@pytest.mark.timeout(300)
def test_a_stage2_run_with_auto_trains_and_its_model_answers_in_the_models_format(dirs, tmp_path):
    from llava_sft.generate import Answerer
    from llava_sft.train.trainer import train

    tokenizer_with(dirs, "chatml", QWEN25, tmp_path)
    make_shapes(tmp_path / "data", seed=2, image_size=32, n_stage1=2, n_stage2=16, n_eval=3, text_only_frac=0.25)
    cfg = run_config(tmp_path / "chatml", tmp_path / "data", tmp_path / "run", stage=2, max_steps=4, lr=3e-3)
    cfg.model.tokenizer_use_fast = True
    cfg.data.template = cfg.model.template = "auto"
    train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and rows[-1]["loss"] < rows[0]["loss"]
    answerer = Answerer(tmp_path / "run", device="cpu")
    prompt = answerer.prompt_for("What color is it?")
    assert prompt.startswith("<|im_start|>system\nYou are Qwen") and prompt.endswith("<|im_start|>assistant\n")
    assert answerer.tokenizer.convert_tokens_to_ids("<|im_end|>") in answerer.stop_ids

    # the eval runner prompts in Qwen2.5's format (written out here) with LLaVA's image placement, batched
    import torch
    from PIL import Image

    from llava_sft.data.tokenize import tokenize_prompt
    from llava_sft.eval import run_vqa

    rows = [json.loads(line) for line in (tmp_path / "data" / "eval" / "questions.jsonl").read_text().splitlines()]
    run_vqa.main(["--model", str(tmp_path / "run"), "--questions", str(tmp_path / "data" / "eval" / "questions.jsonl"),
                  "--image-folder", str(tmp_path / "data" / "images"), "--answers", str(tmp_path / "answers.jsonl"),
                  "--batch-size", "4", "--max-new-tokens", "8", "--device", "cpu"])
    answers = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == len(rows) >= 1 and any(a["text"] for a in answers)
    for row, answer in zip(rows, answers, strict=True):
        written = ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
                   f"<|im_start|>user\n<image>\n{row['text']}<|im_end|>\n<|im_start|>assistant\n")
        ids = torch.tensor([tokenize_prompt(written, answerer.tokenizer)])
        image = answerer.processor(Image.open(tmp_path / "data" / "images" / row["image"]).convert("RGB"))[None]
        with torch.no_grad():
            out = answerer.model.generate(ids, torch.ones_like(ids), image, max_new_tokens=8, do_sample=False,
                                          eos_token_id=answerer.stop_ids, pad_token_id=answerer.tokenizer.pad_token_id)
        assert answer["text"] == answerer.tokenizer.decode(out[0], skip_special_tokens=True).strip()


def test_text_after_an_image_keeps_its_first_token_when_bos_is_a_template_token_the_tokenizer_does_not_add(dirs):
    """SmolLM2's BOS is `<|im_start|>`, written by its template, never added by the tokenizer. LLaVA's
    tokenizer_image_token rule (first chunk starts with BOS -> drop the first token of every later chunk) dropped
    the "\\n" after each image, in training and in generate; the HF export's tokenization check found it."""
    from llava_sft.data.tokenize import tokenize_with_images

    tok = load_tokenizer(str(dirs["chatml"]), use_fast=True)
    tok.bos_token = "<|im_start|>"
    assert tok("a")["input_ids"][:1] != [tok.bos_token_id]  # not added: every chunk's ids are its own
    before, after = "<|im_start|>user\n", "\nWhat is it?<|im_end|>\n<|im_start|>assistant\n"
    want = tok(before)["input_ids"] + [IMAGE_TOKEN_INDEX] + tok(after)["input_ids"]
    assert tokenize_with_images(before + "<image>" + after, tok) == want
    assert tokenize_with_images("<|im_start|>a<image><|im_start|>b", tok).count(tok.bos_token_id) == 2


def test_llama2_chat_supervises_the_reply_after_the_separator_its_template_writes(llama_tokenizer_dir, tmp_path):
    """Llama-2-chat renders `[/INST]` + " " + reply + " " + `</s>`: the generation prompt ends at `[/INST]`, so the
    " " is generated with the reply (SentencePiece's "▁It"); each user turn starts with a textual `<s>` (one BOS
    token, as apply_chat_template's ids)."""
    tok = load_tokenizer(str(llama_tokenizer_dir))
    tok.chat_template = LLAMA2
    for system in (None, "You are helpful."):
        template = get_template("auto", system, tokenizer=tok)
        ids, labels = tokenize_conversation(CHAT, tok, template, num_images=0)
        assert ids == hf_ids(tok, messages(CHAT, system))[0]
        assert ids.count(tok.bos_token_id) == 2  # one per user turn, none doubled
        assert [s.strip() for s in supervised_spans(tok, ids, labels)] == ["It is red. </s>", "Yes, it is big. </s>"]
    assert template.generation_prompt("What is it?").endswith("What is it? [/INST]")


def test_gemma_without_a_system_role_trains_its_turns_and_refuses_a_system_prompt_naming_the_fix(dirs, tmp_path):
    tok = load_tokenizer(str(dirs["llama3"]), use_fast=True)  # adds BOS, as Gemma's tokenizer does
    tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tok.chat_template = GEMMA
    template = get_template("auto", tokenizer=tok)
    ids, labels = tokenize_conversation(CHAT, tok, template, num_images=0)
    assert ids == hf_ids(tok, messages(CHAT))[0] and ids.count(tok.bos_token_id) == 1
    assert supervised_spans(tok, ids, labels) == ["It is red.<end_of_turn>", "Yes, it is big.<end_of_turn>"]
    assert template.generation_prompt("Hi") == "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    with pytest.raises(ValueError, match="System role not supported.*unset it"):
        get_template("auto", "Be brief.", tokenizer=tok)
