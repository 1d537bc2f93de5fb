"""Prompt sets for visual-instruction generation, and parsing the LLM's replies into LLaVA records.

A prompt set is a YAML file (`data_prep/prompts/{conversation,detail,complex_reasoning}.yaml`)::

    kind: conversation          # the generation kind (also the file's stem)
    version: 1                  # bump on every text change (replies are cached per version)
    reply_format: qa            # qa: "Question: ..." / "Answer: ..." pairs; text: the whole reply
    min_rounds: 2               # qa: accepted number of question-answer pairs
    max_rounds: 8
    min_words: 40               # text: shortest accepted reply
    temperature: 0.7
    max_tokens: 1024
    reject_phrases: [...]       # a reply containing one of these (case-insensitive) is rejected
    instructions: [...]         # text: the human turns, one drawn per image
    system: ...                 # the system message
    examples: [{context, response}, ...]   # few-shot pairs, sent as user/assistant messages

The messages sent per image are: system, then each example's context (user) and response
(assistant), then the image's own context (user). Every example response must itself parse (checked
when the set is loaded), so a broken prompt file fails before any request is made.

`parse_reply` returns the (question, answer) pairs or raises `Rejected` with a short reason that the
generation report counts: empty reply, text before the first question, empty question/answer, a
question without answer (or the reverse), too few/many rounds, a repeated question, a reply too short,
`<image>` in the reply, box coordinates or a reject phrase in it.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from llava_sft.constants import IMAGE_PLACEHOLDER

PROMPTS_DIR = Path(__file__).with_name("prompts")
KINDS = ("conversation", "detail", "complex_reasoning")
_MARKER = re.compile(r"^[ \t]*(?:\*\*)?(Question|Answer)(?:[ \t]*\d+)?[ \t]*:(?:\*\*)?[ \t]*", re.I | re.M)
_COORDS = re.compile(r"\[\s*-?\d*\.\d+\s*,\s*-?\d*\.\d+")


class Rejected(ValueError):
    """A reply that does not give a usable sample; `reason` is a short, countable phrase."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True)
class PromptSet:
    kind: str
    version: int
    reply_format: str
    system: str
    examples: tuple[tuple[str, str], ...]
    temperature: float = 0.7
    max_tokens: int = 1024
    min_rounds: int = 1
    max_rounds: int = 10
    min_words: int = 1
    instructions: tuple[str, ...] = ()
    reject_phrases: tuple[str, ...] = ()
    sha: str = ""  # of the file's content: a changed text under the same version is detected

    @property
    def tag(self) -> str:
        return f"{self.kind}/v{self.version}"

    def messages(self, context: str) -> list[dict]:
        out = [{"role": "system", "content": self.system}]
        for example_context, response in self.examples:
            out += [{"role": "user", "content": example_context}, {"role": "assistant", "content": response}]
        return out + [{"role": "user", "content": context}]

    def instruction(self, image_id: str, seed: int) -> str | None:
        """The human turn of a `text` reply, drawn deterministically per (seed, image)."""
        if not self.instructions:
            return None
        return random.Random(f"{seed}:{self.kind}:{image_id}").choice(self.instructions)


def load_prompt_set(path: str | Path) -> PromptSet:
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    raw = yaml.safe_load(text)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping")
    missing = [k for k in ("kind", "version", "reply_format", "system", "examples") if k not in raw]
    if missing:
        raise ValueError(f"{path}: missing field(s) {missing}")
    if raw["reply_format"] not in ("qa", "text"):
        raise ValueError(f"{path}: reply_format must be 'qa' or 'text', got {raw['reply_format']!r}")
    if raw["reply_format"] == "text" and not raw.get("instructions"):
        raise ValueError(f"{path}: reply_format 'text' needs a non-empty 'instructions' list")
    known = set(PromptSet.__dataclass_fields__) - {"sha"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{path}: unknown field(s) {unknown}")
    examples = tuple((str(e["context"]), str(e["response"])) for e in raw["examples"])
    fields = dict(raw, examples=examples, instructions=tuple(raw.get("instructions") or ()),
                  reject_phrases=tuple(str(p).lower() for p in raw.get("reject_phrases") or ()))
    ps = PromptSet(**fields, sha=hashlib.sha256(text.encode()).hexdigest()[:16])
    for i, (_, response) in enumerate(ps.examples):
        try:
            parse_reply(ps, response)
        except Rejected as e:
            raise ValueError(f"{path}: few-shot example {i} does not parse itself ({e.reason})") from None
    return ps


def load_prompt_sets(kinds=KINDS, prompts_dir: str | Path = PROMPTS_DIR) -> dict[str, PromptSet]:
    sets = {}
    for kind in kinds:
        path = Path(prompts_dir) / f"{kind}.yaml"
        if not path.is_file():
            raise ValueError(f"no prompt set for kind {kind!r}: {path} does not exist")
        sets[kind] = load_prompt_set(path)
        if sets[kind].kind != kind:
            raise ValueError(f"{path}: declares kind {sets[kind].kind!r}, expected {kind!r}")
    return sets


def _check_text(ps: PromptSet, text: str) -> None:
    if IMAGE_PLACEHOLDER in text:
        raise Rejected(f"{IMAGE_PLACEHOLDER} in the reply")
    if _COORDS.search(text):
        raise Rejected("box coordinates in the reply")
    low = text.lower()
    for phrase in ps.reject_phrases:
        if phrase in low:
            raise Rejected(f"reject phrase '{phrase}'")


def parse_reply(ps: PromptSet, reply: str) -> list[tuple[str, str]]:
    """[(question, answer), ...] (one pair with question None for `text` sets), or raise Rejected."""
    reply = (reply or "").strip()
    if not reply:
        raise Rejected("empty reply")
    _check_text(ps, reply)
    if ps.reply_format == "text":
        if len(reply.split()) < ps.min_words:
            raise Rejected(f"shorter than {ps.min_words} words")
        return [(None, reply)]
    marks = list(_MARKER.finditer(reply))
    if not marks:
        raise Rejected("no question/answer pairs")
    if reply[:marks[0].start()].strip():
        raise Rejected("text before the first question")
    parts = [(m.group(1).lower(), reply[m.end():nxt].strip())
             for m, nxt in zip(marks, [m.start() for m in marks[1:]] + [len(reply)], strict=True)]
    pairs, seen = [], set()
    for i in range(0, len(parts), 2):
        (role_q, question), (role_a, answer) = parts[i], parts[i + 1] if i + 1 < len(parts) else ("", "")
        if role_q != "question":
            raise Rejected("answer without a question")
        if role_a != "answer":
            raise Rejected("question without an answer")
        if not question or not answer:
            raise Rejected("empty question or answer")
        key = " ".join(question.lower().split())
        if key in seen:
            raise Rejected("repeated question")
        seen.add(key)
        pairs.append((question, answer))
    if not ps.min_rounds <= len(pairs) <= ps.max_rounds:
        raise Rejected(f"{len(pairs)} rounds (expected {ps.min_rounds}-{ps.max_rounds})")
    return pairs


def to_record(record_id: str, image: str, kind: str, pairs: list[tuple[str | None, str]],
              instruction: str | None = None) -> dict:
    """A LLaVA record; `<image>` opens the first human turn."""
    conversations = []
    for i, (question, answer) in enumerate(pairs):
        question = instruction if question is None else question
        if i == 0:
            question = f"{IMAGE_PLACEHOLDER}\n{question}"
        conversations += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return {"id": record_id, "image": image, "kind": kind, "conversations": conversations}


def prompt_preview(ps: PromptSet, context: str) -> str:
    """The messages of one request as readable JSON (for --dry-run)."""
    return json.dumps(ps.messages(context), indent=2, ensure_ascii=False)
