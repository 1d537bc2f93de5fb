"""Our chat templates (data/templates.yaml) as a Jinja `chat_template`, for HF tokenizers and processors; and, for
a model trained with `data.template: auto`, the model's own Jinja wrapped so that it places images as training did.

The Jinja text is generated from the template's fields, so `tokenizer.apply_chat_template(messages)` renders
exactly what `ChatTemplate.generation_prompt` (with `add_generation_prompt=True`) and `ChatTemplate.render`
(a whole conversation) render: same system prompt, same `<image>` placement (moved to the start of the user
turn, each followed by "\\n", when `image_at_turn_start`), same separators. Messages use HF roles
(`system`, `user`, `assistant`); `content` is a string (with `<image>` markers) or a list of
`{"type": "image"}` / `{"type": "text", "text": ...}` items (the processor format), read in order.
"""
from __future__ import annotations

import json

from llava_sft.constants import IMAGE_PLACEHOLDER
from llava_sft.data.templates import ChatTemplate


def _lit(text: str) -> str:
    """A Jinja string literal (Jinja unescapes Python-style backslash escapes, which JSON's are)."""
    return json.dumps(text)


def _fmt(format_string: str, field: str, value: str) -> str:
    """Jinja expression for `format_string.format(**{field: value})` with `value` a Jinja expression."""
    marker = "{" + field + "}"
    if format_string.count(marker) != 1 or format_string.replace(marker, "").count("{") or "}" in format_string.replace(marker, ""):
        raise ValueError(f"template format {format_string!r} must hold {marker} exactly once and no other field")
    before, after = format_string.split(marker)
    return f"{_lit(before)} + {value} + {_lit(after)}"


# Sets `text` (all text of the message) and `n_images` (images: {"type": "image"} items and <image> markers).
_READ_CONTENT = """{%- if message['content'] is string -%}
{%- set text = message['content'] -%}
{%- else -%}
{%- set ns = namespace(text='', n=0) -%}
{%- for item in message['content'] -%}
{%- if item['type'] == 'image' -%}{%- set ns.n = ns.n + 1 -%}{%- set ns.text = ns.text + IMG -%}
{%- elif item['type'] == 'text' -%}{%- set ns.text = ns.text + item['text'] -%}{%- endif -%}
{%- endfor -%}
{%- set text = ns.text -%}
{%- endif -%}
{%- set n_images = text.count(IMG) -%}"""


def to_jinja(template: ChatTemplate) -> str:
    """The Jinja chat template rendering `template` (its `system` is the default system prompt)."""
    head = "{%- set IMG = " + _lit(IMAGE_PLACEHOLDER) + " -%}\n"
    if template.kind == "plain":
        # LLaVA's Stage-1 format: the user text is dropped, only its images remain (at least one).
        return head + "{%- for message in messages -%}\n{%- if message['role'] == 'user' -%}\n" + _READ_CONTENT + (
            "\n{{- IMG * ([n_images, 1] | max) -}}\n"
            "{%- elif message['role'] == 'assistant' -%}\n{{- message['content'] + " + _lit(template.caption_suffix) + " -}}\n"
            "{%- endif -%}\n{%- endfor -%}"
        )
    if template.image_at_turn_start:
        user_content = ("((" + _lit(IMAGE_PLACEHOLDER + "\n") + " * n_images + text.replace(IMG, '').strip()).strip()"
                        " if n_images > 0 else text)")
    else:
        user_content = "text"
    parts = [
        head,
        "{%- set system = " + _lit(template.system) + " -%}\n",
        "{%- if messages and messages[0]['role'] == 'system' -%}\n",
        "{%- set message = messages[0] -%}\n" + _READ_CONTENT + "\n",
        "{%- set system = text -%}{%- set messages = messages[1:] -%}\n",
        "{%- endif -%}\n",
        "{%- if system -%}{{- " + _fmt(template.system_format, "system", "system") + " -}}{%- endif -%}\n",
        "{%- for message in messages -%}\n",
        "{%- if message['role'] == 'user' -%}\n" + _READ_CONTENT + "\n",
        "{{- " + _fmt(template.user_format, "content", user_content) + " -}}\n",
        "{%- elif message['role'] == 'assistant' -%}\n",
        "{%- set text = message['content'] if message['content'] is string else "
        "message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') -%}\n",
        "{{- " + _lit(template.assistant_header) + " + " + _fmt(template.assistant_format, "content", "text")
        + " + " + _lit(template.assistant_suffix) + " -}}\n",
        "{%- else -%}{{- raise_exception('unknown role ' + message['role']) -}}\n",
        "{%- endif -%}\n{%- endfor -%}\n",
        "{%- if add_generation_prompt -%}{{- " + _lit(template.assistant_header) + " -}}{%- endif -%}",
    ]
    return "".join(parts)


def wrap_model_template(template) -> str:
    """The Jinja chat template rendering what the `auto` template (data/auto_template.py) renders: the model's own
    Jinja, after a prelude that rewrites `messages` as training saw them.

    The prelude turns each message's content into a string (processor-format lists read in order, `{"type":
    "image"}` as `<image>`), moves a user turn's images to its start, each followed by "\\n" (LLaVA's placement,
    `images_first`), and adds the run's `model.system_prompt` as a system message when the conversation has none.
    Where the tokenizer adds BOS itself, `bos_token` is emptied for the model's Jinja, as `auto` drops the template's
    textual BOS: `processor(text=rendered)` then gives exactly our ids (with BOS written by the template and added
    by the tokenizer, a Llama-3 prompt would start with two). hf_llava.check_rendering checks the result at export.
    """
    jinja = template.tokenizer.chat_template
    if isinstance(jinja, dict):
        jinja = jinja.get("default")
    to_string = _READ_CONTENT.replace("{%- set n_images = text.count(IMG) -%}", "")
    prelude = [
        "{%- set IMG = " + _lit(IMAGE_PLACEHOLDER) + " -%}\n",
        "{%- set _llava = namespace(messages=[]) -%}\n",
    ]
    if template.system:
        prelude.append("{%- if not messages or messages[0]['role'] != 'system' -%}"
                       "{%- set _llava.messages = [{'role': 'system', 'content': " + _lit(template.system) + "}] -%}"
                       "{%- endif -%}\n")
    prelude += [
        "{%- for message in messages -%}\n" + to_string + "\n",
        "{%- set n_images = text.count(IMG) -%}\n",
        "{%- if message['role'] == 'user' and n_images > 0 -%}",
        "{%- set text = ((" + _lit(IMAGE_PLACEHOLDER + "\n") + " * n_images + text.replace(IMG, '').strip()).strip()) -%}",
        "{%- endif -%}\n",
        "{%- set _llava.messages = _llava.messages + [{'role': message['role'], 'content': text}] -%}\n",
        "{%- endfor -%}\n",
        "{%- set messages = _llava.messages -%}\n",
    ]
    if template.bos_text:
        prelude.append("{%- set bos_token = '' -%}\n")
    return "".join(prelude) + jinja
