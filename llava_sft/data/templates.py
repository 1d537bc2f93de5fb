"""Chat templates: load them from `templates.yaml` and render conversations to text segments.

A template turns a LLaVA conversation (`[{"from": "human"|"gpt", "value": str}, ...]`) into an
ordered list of `Segment(text, supervised)`. Only the assistant replies and their end-of-turn
markers are supervised. `llava_sft.data.tokenize` turns the segments into token ids and labels;
nothing in this module knows about tokens.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import yaml

from llava_sft.constants import IMAGE_PLACEHOLDER

TEMPLATES_FILE = Path(__file__).with_name("templates.yaml")
ROLE_USER, ROLE_ASSISTANT = "human", "gpt"


class BadSampleError(ValueError):
    """A sample whose tokens or labels cannot be established. Names the sample id."""

    def __init__(self, sample_id, reason: str):
        self.sample_id = sample_id
        self.reason = reason
        super().__init__(f"sample {sample_id!r}: {reason}")

    def __reduce__(self):  # picklable (start-up check workers send it back): rebuilt from its two fields
        return type(self), (self.sample_id, self.reason)


@dataclass(frozen=True)
class Segment:
    text: str
    supervised: bool


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    kind: str = "chat"  # "chat" or "plain"
    system: str = ""
    system_format: str = "{system}"
    user_format: str = "{content}"
    assistant_header: str = ""
    assistant_format: str = "{content}"
    assistant_suffix: str = ""
    caption_suffix: str = "\n"
    stop_strings: tuple[str, ...] = field(default_factory=tuple)
    image_at_turn_start: bool = True
    loss_on: str = "replies"  # data.loss_on: "all" marks every segment supervised (the no-masking ablation)

    def control_strings(self) -> tuple[str, ...]:
        """The markers this template writes around the content (role headers, end-of-turn and stop strings, e.g.
        'USER:', 'ASSISTANT:', '</s>' for vicuna_v1), whitespace-only ones left out."""
        parts = []
        for fmt in (self.user_format, self.assistant_header, self.assistant_format, self.assistant_suffix):
            parts += fmt.split("{content}")
        found = {p.strip() for p in parts + list(self.stop_strings)}
        return tuple(sorted(s for s in found if s))

    # ------------------------------------------------------------------ training
    def render(self, conversations: list[dict], num_images: int, sample_id="?") -> list[Segment]:
        """Render a whole training conversation into segments (checks its structure)."""
        turns = _check_turns(conversations, sample_id)
        n_placeholders = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in turns)
        if n_placeholders != num_images:
            raise BadSampleError(
                sample_id, f"{n_placeholders} '{IMAGE_PLACEHOLDER}' placeholder(s) but {num_images} image(s)"
            )
        segments = self._render_plain(turns, num_images, sample_id) if self.kind == "plain" else self._render_chat(turns)
        return [Segment(s.text, True) for s in segments] if self.loss_on == "all" else segments

    def _render_chat(self, turns) -> list[Segment]:
        segments = self._system_segments()
        for user, assistant in zip(turns[0::2], turns[1::2], strict=True):
            segments.append(Segment(self.user_format.format(content=self._user_content(user["value"])), False))
            segments.append(Segment(self.assistant_header, False))
            segments.append(Segment(self.assistant_format.format(content=assistant["value"]), True))
            if self.assistant_suffix:
                segments.append(Segment(self.assistant_suffix, False))
        return [s for s in segments if s.text]

    def _render_plain(self, turns, num_images, sample_id) -> list[Segment]:
        if len(turns) != 2:
            raise BadSampleError(sample_id, f"template 'plain' needs exactly one human and one gpt turn, got {len(turns)} turns")
        if num_images < 1:
            raise BadSampleError(sample_id, "template 'plain' needs an image (Stage-1 captioning)")
        # As LLaVA's preprocess_plain: the human text is dropped, only the image(s) remain.
        return [Segment(IMAGE_PLACEHOLDER * num_images, False), Segment(turns[1]["value"] + self.caption_suffix, True)]

    # ---------------------------------------------------------------- inference
    def generation_prompt(self, question: str, history: list[tuple[str, str]] = (), system: str | None = None) -> str:
        """The prompt text for answering `question` (after optional (user, assistant) history)."""
        if self.kind == "plain":
            return IMAGE_PLACEHOLDER * max(1, question.count(IMAGE_PLACEHOLDER))
        text = "".join(s.text for s in self._system_segments(system))
        for user, assistant in history:
            text += self.user_format.format(content=self._user_content(user)) + self.assistant_header
            text += self.assistant_format.format(content=assistant) + self.assistant_suffix
        return text + self.user_format.format(content=self._user_content(question)) + self.assistant_header

    # ------------------------------------------------------------------ helpers
    def _system_segments(self, system: str | None = None) -> list[Segment]:
        system = self.system if system is None else system
        return [Segment(self.system_format.format(system=system), False)] if system else []

    def _user_content(self, value: str) -> str:
        return images_first(value) if self.image_at_turn_start else value


def images_first(value: str) -> str:
    """LLaVA's preprocess_multimodal: drop the `<image>` markers, strip, put them first, each followed by "\n"."""
    n = value.count(IMAGE_PLACEHOLDER)
    if n == 0:
        return value
    rest = value.replace(IMAGE_PLACEHOLDER, "").strip()
    return ((IMAGE_PLACEHOLDER + "\n") * n + rest).strip()


def _check_turns(conversations, sample_id) -> list[dict]:
    if not isinstance(conversations, list) or not conversations:
        raise BadSampleError(sample_id, "no conversation turns")
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise BadSampleError(sample_id, f"turn {i} is not {{'from': ..., 'value': str}}")
        expected = ROLE_USER if i % 2 == 0 else ROLE_ASSISTANT
        if turn.get("from") != expected:
            raise BadSampleError(
                sample_id, f"turn {i} is from {turn.get('from')!r}, expected {expected!r} (roles must alternate, human first)"
            )
    if len(conversations) % 2:
        raise BadSampleError(sample_id, f"odd number of turns ({len(conversations)}): the last human turn has no reply")
    for i, turn in enumerate(conversations[1::2]):
        if not turn["value"].strip():
            raise BadSampleError(sample_id, f"assistant turn {2 * i + 1} is empty")
        if IMAGE_PLACEHOLDER in turn["value"]:
            raise BadSampleError(sample_id, f"assistant turn {2 * i + 1} contains '{IMAGE_PLACEHOLDER}'")
    return conversations


@lru_cache(maxsize=None)
def _load_all() -> dict[str, ChatTemplate]:
    raw = yaml.safe_load(TEMPLATES_FILE.read_text())
    templates = {}
    for name, fields in raw.items():
        fields = dict(fields)
        fields["stop_strings"] = tuple(fields.get("stop_strings", ()))
        templates[name] = ChatTemplate(name=name, **fields)
    return templates


AUTO = "auto"  # data.template / model.template: the tokenizer's own chat template


def list_templates() -> list[str]:
    return sorted(_load_all())


def get_template(name: str, system_prompt: str | None = None, loss_on: str = "replies", tokenizer=None):
    """The named template; `system_prompt` (if not None) replaces its default system prompt; `loss_on="all"`
    (data.loss_on) supervises every text token. "auto": the tokenizer's own chat template (data/auto_template.py;
    `tokenizer` is then required)."""
    if name == AUTO:
        if tokenizer is None:
            raise ValueError("template 'auto' renders with the tokenizer's own chat template: pass the tokenizer")
        from llava_sft.data.auto_template import AutoTemplate

        return AutoTemplate(tokenizer, system_prompt, loss_on)
    templates = _load_all()
    if name not in templates:
        raise KeyError(f"unknown chat template {name!r}; known: {', '.join(sorted(templates))}")
    template = templates[name]
    if loss_on not in ("replies", "all"):
        raise ValueError(f"loss_on must be 'replies' or 'all', got {loss_on!r}")
    if system_prompt is not None:
        template = dataclasses.replace(template, system=system_prompt)
    return template if loss_on == "replies" else dataclasses.replace(template, loss_on=loss_on)

