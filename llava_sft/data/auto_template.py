"""`data.template: auto`: render with the tokenizer's own `chat_template` (its Jinja, through transformers), with loss
on exactly the assistant replies and their end-of-turn tokens.

A current chat LLM (Qwen2.5, Qwen3, Llama-3.1, SmolLM2, Mistral, Gemma) was trained on its own template; naming one
of ours that only looks like it costs accuracy silently (data/template_check.py refuses that). `auto` renders what
`tokenizer.apply_chat_template` renders and finds each reply's span from the template itself, turn by turn:

* the text up to reply k is the rendering of the conversation up to its user turn with the generation prompt
  (`add_generation_prompt=True`); the rendering with reply k must start with it and continue with the reply's text
  verbatim, after at most a whitespace separator the template writes (Llama-2-chat's `[/INST]` + " " + reply),
  which is supervised with the reply, as the model generates it after the prompt; what follows up to and including the first special token (`<|im_end|>`, `<|eot_id|>`, `</s>`,
  `<end_of_turn>`) is the end-of-turn, supervised with the reply; the rest (a "\\n") is not;
* every rendering must extend the previous one (a template that rewrites earlier turns, e.g. one that drops
  `<think>` blocks from history, or changes a reply's text) makes the sample a bad sample naming why, never a
  guessed mask.

Tokenization is the pipeline's own (data/tokenize.py: the whole text at once, boundaries checked), so a text-only
sample gets the ids of `apply_chat_template(..., tokenize=True)`: the template's textual BOS is dropped where the
tokenizer adds BOS itself. `<image>` keeps LLaVA's placement (moved to the start of its user turn, each followed
by "\\n"), before the template sees the text. A system prompt (`model.system_prompt`) goes in as a system message;
without one the template writes its own default, as the model was trained.
"""
from __future__ import annotations

import hashlib

from llava_sft.constants import IMAGE_PLACEHOLDER
from llava_sft.data.templates import BadSampleError, Segment, _check_turns, images_first

PROBE = [{"from": "human", "value": "Hi!"}, {"from": "gpt", "value": "Hello."}]


class AutoTemplate:
    name = "auto"
    kind = "chat"
    image_at_turn_start = True

    def __init__(self, tokenizer, system: str | None = None, loss_on: str = "replies"):
        jinja = getattr(tokenizer, "chat_template", None)
        if isinstance(jinja, dict):  # several named templates: the default one
            jinja = jinja.get("default")
        if not jinja:
            raise ValueError(f"data.template=auto needs a tokenizer with a chat_template; "
                             f"{getattr(tokenizer, 'name_or_path', 'this tokenizer')} has none: name one of ours "
                             f"(vicuna_v1, chatml, llama3)")
        if loss_on not in ("replies", "all"):
            raise ValueError(f"loss_on must be 'replies' or 'all', got {loss_on!r}")
        self.tokenizer, self.system, self.loss_on = tokenizer, system, "replies"
        self.fingerprint = hashlib.sha256(jinja.encode()).hexdigest()[:12]
        with_bos = tokenizer("a", add_special_tokens=True)["input_ids"]
        adds_bos = tokenizer.bos_token_id is not None and with_bos[:1] == [tokenizer.bos_token_id]
        self.bos_text = tokenizer.bos_token if adds_bos else None
        self._special = sorted({t for t in tokenizer.all_special_tokens if t.strip()} |
                               {t.content for t in tokenizer.added_tokens_decoder.values() if t.special},
                               key=len, reverse=True)
        try:
            segments = self.render(PROBE, 0, sample_id="(the template's probe)")
        except BadSampleError as e:
            hint = (" (a template without a system role, e.g. Gemma's, refuses model.system_prompt / "
                    "data.system_prompt: unset it)" if system else "")
            raise ValueError(f"data.template=auto cannot use this tokenizer's chat template with system prompt "
                             f"{system!r}: {e.reason}{hint}") from None
        reply = next(s.text for s in segments if s.supervised)
        self.stop_strings = tuple(t for t in self._special if reply.endswith(t))[:1]  # the end-of-turn token
        probe_text = "".join(s.text for s in segments)
        self._control = tuple(sorted(t for t in self._special if t in probe_text))
        self.loss_on = loss_on

    def __repr__(self) -> str:  # part of the start-up cache's key (data/catalog.py)
        return (f"AutoTemplate(jinja sha256 {self.fingerprint}, system={self.system!r}, loss_on={self.loss_on!r}, "
                f"bos_text={self.bos_text!r})")

    def control_strings(self) -> tuple[str, ...]:
        return self._control

    # ------------------------------------------------------------------ rendering
    def _apply(self, messages: list[dict], generation_prompt: bool, sample_id="?") -> str:
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=generation_prompt)
        except Exception as e:  # jinja2's TemplateError, raised by the template itself (raise_exception)
            raise BadSampleError(sample_id, f"the chat template refused it: {type(e).__name__}: {e}") from None
        if self.bos_text and text.startswith(self.bos_text):
            text = text[len(self.bos_text):]  # the tokenizer adds it when encoding
        return text

    def _messages(self, turns: list[dict], system: str | None) -> list[dict]:
        messages = [{"role": "system", "content": system}] if system else []
        for i, turn in enumerate(turns):
            user = i % 2 == 0
            messages.append({"role": "user" if user else "assistant",
                             "content": images_first(turn["value"]) if user else turn["value"]})
        return messages

    def _end_of_turn(self, tail: str) -> str | None:
        """The tail's text up to and including its first special token."""
        found = [(tail.find(t), t) for t in self._special if t in tail]
        if not found:
            return None
        at, token = min(found, key=lambda x: (x[0], -len(x[1])))
        return tail[:at + len(token)]

    def render(self, conversations: list[dict], num_images: int, sample_id="?") -> list[Segment]:
        turns = _check_turns(conversations, sample_id)
        n_placeholders = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in turns)
        if n_placeholders != num_images:
            raise BadSampleError(sample_id, f"{n_placeholders} '{IMAGE_PLACEHOLDER}' placeholder(s) but {num_images} "
                                            f"image(s)")
        messages = self._messages(turns, self.system)
        offset = len(messages) - len(turns)  # the system message
        segments, done = [], ""
        for k in range(0, len(turns), 2):
            prompt = self._apply(messages[:offset + k + 1], True, sample_id)
            if not prompt.startswith(done):
                raise BadSampleError(sample_id, f"auto template: the rendering up to turn {k} does not extend the "
                                                f"rendering of the turns before it (the chat template rewrites "
                                                f"history): reply spans cannot be established")
            full = self._apply(messages[:offset + k + 2], False, sample_id)
            reply = turns[k + 1]["value"]
            after = full[len(prompt):] if full.startswith(prompt) else None
            if after is not None and not after.startswith(reply):  # a separator the template writes before it
                lead = after[:len(after) - len(after.lstrip())]  # (Llama-2-chat, Vicuna: "[/INST]" + " " + reply)
                reply = lead + reply if lead and after[len(lead):].startswith(reply) else reply
            if after is None or not after.startswith(reply):
                raise BadSampleError(sample_id, f"auto template: assistant turn {k + 1} is not rendered as its "
                                                f"generation prompt followed by the reply's text verbatim (the chat "
                                                f"template strips or rewrites it): its span cannot be established")
            tail = after[len(reply):]
            end = self._end_of_turn(tail)
            if end is None:
                raise BadSampleError(sample_id, f"auto template: no end-of-turn special token after assistant turn "
                                                f"{k + 1} ({tail[:30]!r}): the reply's end cannot be supervised")
            segments += [Segment(prompt[len(done):], False), Segment(reply + end, True),
                         Segment(tail[len(end):], False)]
            done = full
        segments = [s for s in segments if s.text]
        return [Segment(s.text, True) for s in segments] if self.loss_on == "all" else segments

    def generation_prompt(self, question: str, history: list[tuple[str, str]] = (), system: str | None = None) -> str:
        turns = [{"from": r, "value": v} for u, a in history for r, v in (("human", u), ("gpt", a))]
        turns.append({"from": "human", "value": question})
        return self._apply(self._messages(turns, self.system if system is None else system), True)
