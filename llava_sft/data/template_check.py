"""The start-up template check: is the template the run names the model's own?

"Use the wrong chat template and performance drops badly" (the demo measures it: 0.738 -> 0.117). A tokenizer that
carries a `chat_template` says how its model was trained to see a conversation; when the run names one of ours
(`chatml`, `llama3`, `vicuna_v1`), a probe conversation is rendered both ways, to token ids, before anything heavy
loads: our pipeline (`data/tokenize.py`) against `tokenizer.apply_chat_template`. A difference stops the run (exit 2)
with the first differing tokens side by side and the fix, unless `data.template_check` is `warn` or `off`.

The model's template renders its own default system prompt when the conversation has none (SmolLM2: "You are a
helpful AI assistant named SmolLM, trained by Hugging Face"; Qwen2.5: "You are Qwen, created by Alibaba Cloud. ...");
ours renders the template's default, or `model.system_prompt`, which is then passed to the model's template as a
system message too. Vicuna-v1.5 tokenizers carry no template: nothing to check (`vicuna_v1` stays
reference-exact). `plain` (Stage 1) is not a chat format: not checked.
"""
from __future__ import annotations

import logging

from llava_sft.data.templates import ChatTemplate

log = logging.getLogger(__name__)

PROBE = [{"from": "human", "value": "Hello! What is in the picture?"}, {"from": "gpt", "value": "A red circle."},
         {"from": "human", "value": "Where is it?"}, {"from": "gpt", "value": "At the top left."}]


class TemplateMismatch(ValueError):
    """The named template renders a conversation differently from the tokenizer's own chat template."""


def _messages(system: str | None) -> list[dict]:
    roles = {"human": "user", "gpt": "assistant"}
    messages = [{"role": roles[t["from"]], "content": t["value"]} for t in PROBE]
    return ([{"role": "system", "content": system}] if system else []) + messages


def compare(tokenizer, template: ChatTemplate, system_prompt: str | None) -> str | None:
    """None when the tokenizer has no chat template, the template is `plain`, or both give the same ids; else the
    message naming the first difference and the fix."""
    from llava_sft.data.tokenize import tokenize_conversation

    if template.kind != "chat" or not getattr(tokenizer, "chat_template", None):
        return None
    ours, _ = tokenize_conversation(PROBE, tokenizer, template, num_images=0)
    ours = [int(i) for i in ours]
    theirs = _apply(tokenizer, _messages(system_prompt))
    if ours == theirs:
        return None
    first = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), min(len(ours), len(theirs)))
    lo = max(0, first - 3)

    def shown(ids: list[int]) -> str:
        window = tokenizer.convert_ids_to_tokens(ids[lo:first + 6])
        return " ".join(repr(t) for t in window) + (" ..." if len(ids) > first + 6 else "")

    why = ""
    if system_prompt is None and _apply(tokenizer, _messages(template.system)) == ours:
        why = (f" Only the system prompt differs: with no system turn the model's template writes its own default, "
               f"ours writes {template.system!r}. Set model.system_prompt to the model's default (its rendering: "
               f"{_system_text(tokenizer)!r}), or use data.template=auto.")
    return (f"data.template={template.name} is not the tokenizer's own chat template "
            f"({getattr(tokenizer, 'name_or_path', '')}): a probe conversation gives {len(ours)} tokens our way "
            f"and {len(theirs)} the model's way, first differing at token {first}:\n"
            f"    ours:    {shown(ours)}\n    model's: {shown(theirs)}\n"
            f" {why.strip()} Fix: data.template=auto (the model's own template), name the one it was trained with, "
            f"or set data.template_check=warn "
            f"(or off) to train with {template.name} anyway.").replace("\n ", "\n").rstrip()


def _apply(tokenizer, messages: list[dict]) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=False)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers 5.x returns a BatchEncoding
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def _system_text(tokenizer) -> str:
    """The model's rendering of a conversation without a system turn, up to the first user message."""
    text = tokenizer.apply_chat_template(_messages(None)[:1], tokenize=False)
    return text.split(PROBE[0]["value"])[0][:200]


def carries_template(path: str) -> bool:
    """Does the tokenizer directory carry a chat template (chat_template.jinja / .json, or in
    tokenizer_config.json)? Read from the files, without loading the tokenizer; a non-directory (a hub name): True,
    the tokenizer is then loaded to see."""
    import json
    from pathlib import Path

    root = Path(path)
    if not root.is_dir():
        return True
    if (root / "chat_template.jinja").is_file() or (root / "chat_template.json").is_file():
        return True
    try:
        return bool(json.loads((root / "tokenizer_config.json").read_text()).get("chat_template"))
    except (OSError, ValueError):
        return False


def check_run(cfg) -> None:
    """The check for a run config, before any weights load (train/trainer.py)."""
    from llava_sft.data.templates import get_template

    path = cfg.model.tokenizer or cfg.model.llm.path
    if cfg.data.template == "auto":  # the model's own, by definition
        return
    template = get_template(cfg.data.template, cfg.model.system_prompt)
    if cfg.data.template_check == "off" or template.kind != "chat" or not path or not carries_template(path):
        return
    from llava_sft.model.llava import load_tokenizer

    check(load_tokenizer(path, use_fast=cfg.model.tokenizer_use_fast), template, cfg.model.system_prompt,
          cfg.data.template_check)


def check(tokenizer, template: ChatTemplate, system_prompt: str | None, mode: str) -> None:
    """data.template_check: "error" raises TemplateMismatch, "warn" logs it, "off" does nothing."""
    if mode == "off":
        return
    problem = compare(tokenizer, template, system_prompt)
    if problem is None:
        return
    if mode == "warn":
        log.warning("%s", problem)
        return
    raise TemplateMismatch(problem)
