"""Preference pairs (Stage 3, DPO): the records, their two renderings, the pair samples.

A record (JSON list or JSONL, as the SFT data; data_prep/convert_preferences.py writes it from the public sets):

    {"id": "...", "image": "a.jpg" (or "images": [...], or none),
     "conversations": [{"from": "human", "value": "<image>\\nWhat is ...?"}, ... ending with a human turn],
     "chosen": "the preferred reply", "rejected": "the dispreferred reply"}

A bare `"prompt": "<image>\\nWhat is ...?"` stands for a one-turn conversation. Each side is the conversation with
its reply as the last assistant turn, rendered by the run's chat template (data/tokenize.py, the one place masking
is decided), and only that **last reply** and its end-of-turn token are scored: earlier replies of a multi-turn
prompt, the prompt and image positions never are (`last_reply_only`).

Bad pairs are bad samples (named at start-up or skipped and counted, as any other): no reply, an empty reply, the
same reply on both sides (nothing to prefer: its loss is ln 2 with a zero gradient), a conversation that does not
end with a human turn, and two sides whose prompts tokenize differently before the reply (a token straddling the
prompt/reply boundary: the pair would compare two different prompts).

A pair sample holds both sides' tokens and the images once; `pair_sides` gives the collators the two sides as
ordinary samples that share the image tensor, so the batch carries each image once and the model encodes it once
for both sides (data/dataset.py: image_fields, `image_index`).
"""
from __future__ import annotations

import logging

import torch

from llava_sft.constants import IGNORE_INDEX
from llava_sft.data.anyres import image_token_counts
from llava_sft.data.dataset import LlavaJsonDataset, fit_length, image_list, read_records
from llava_sft.data.templates import ROLE_ASSISTANT, ROLE_USER, BadSampleError, Segment
from llava_sft.data.tokenize import tokenize_segments

log = logging.getLogger(__name__)
SIDES = ("chosen", "rejected")


def normalize_record(record):
    """The record in the canonical form: `prompt` -> a one-turn `conversations`, `images` -> `image`. Leaves
    anything it does not recognise for `pair_conversations` to name."""
    if not isinstance(record, dict):
        return record
    record = dict(record)
    if "conversations" not in record and isinstance(record.get("prompt"), str):
        record["conversations"] = [{"from": ROLE_USER, "value": record.pop("prompt")}]
    if "image" not in record and "images" in record:
        images = record.pop("images")
        record["image"] = images[0] if isinstance(images, list) and len(images) == 1 else images
    return record


def pair_conversations(record: dict, sample_id="?") -> tuple[list[dict], list[dict]]:
    """(chosen conversation, rejected conversation): the prompt turns with each reply appended as the last
    assistant turn. BadSampleError for a record that is not a preference pair."""
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise BadSampleError(sample_id, "a preference record needs 'conversations' (ending with a human turn) or "
                                        "'prompt'")
    if not isinstance(turns[-1], dict) or turns[-1].get("from") != ROLE_USER:
        raise BadSampleError(sample_id, "the conversation of a preference pair must end with a human turn (the "
                                        "replies to compare are 'chosen' and 'rejected')")
    replies = []
    for side in SIDES:
        reply = record.get(side)
        if not isinstance(reply, str):
            raise BadSampleError(sample_id, f"'{side}' must be a string (the {side} reply), got {type(reply).__name__}")
        if not reply.strip():
            raise BadSampleError(sample_id, f"the {side} reply is empty")
        replies.append(reply)
    if replies[0].strip() == replies[1].strip():
        raise BadSampleError(sample_id, "the chosen and rejected replies are the same (nothing to prefer)")
    return tuple(turns + [{"from": ROLE_ASSISTANT, "value": reply}] for reply in replies)


def last_reply_only(segments: list[Segment]) -> list[Segment]:
    """The segments with only the last supervised run kept supervised: the last reply and its end-of-turn."""
    flags = [s.supervised for s in segments]
    if not any(flags):
        return segments
    end = len(flags) - flags[::-1].index(True)
    start = end
    while start > 0 and flags[start - 1]:
        start -= 1
    return [Segment(s.text, start <= i < end) for i, s in enumerate(segments)]


def tokenize_pair(record: dict, tokenizer, template, num_images: int, sample_id="?"):
    """[(ids, labels) of the chosen side, (ids, labels) of the rejected side], the last reply scored; the prompt
    tokens before each reply must be the same on both sides."""
    sides = []
    for conversations in pair_conversations(record, sample_id):
        segments = last_reply_only(template.render(conversations, num_images=num_images, sample_id=sample_id))
        sides.append(tokenize_segments(segments, tokenizer, sample_id=sample_id))
    prompts = [ids[:_first_label(labels)] for ids, labels in sides]
    if prompts[0] != prompts[1]:
        raise BadSampleError(sample_id, "the chosen and rejected sides tokenize differently before the reply (a token "
                                        "straddles the prompt/reply boundary): the pair would compare two prompts")
    return sides


def _first_label(labels: list[int]) -> int:
    return next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)


def pair_sides(sample: dict) -> list[dict]:
    """A pair sample -> its two sides as ordinary samples (chosen first) sharing the pair's image tensors; a
    precomputed reference's log-probs ride along (`reference`)."""
    shared = {k: sample[k] for k in ("images", "image_sizes", "image_tokens") if k in sample}
    sides = []
    for k, side in enumerate(SIDES):
        part = {"id": sample["id"], "input_ids": sample[f"{side}_ids"], "labels": sample[f"{side}_labels"],
                "truncated": sample["truncated"] if k == 0 else 0, "converted": sample.get("converted", 0) if k == 0
                else 0, **shared}
        if "reference" in sample:
            part["reference"] = sample["reference"][k]
        sides.append(part)
    return sides


class PreferenceDataset(LlavaJsonDataset):
    """Preference pairs from a JSON / JSONL file, checked at start-up as SFT data is (both sides, data/catalog.py);
    a sample holds both sides' tokens and the images once. `attach_reference` adds a precomputed reference's
    log-probs to every sample (train/reference.py)."""

    pairs = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reference: dict[str, tuple[float, float]] | None = None

    @staticmethod
    def read(path) -> list[dict]:
        return [normalize_record(r) for r in read_records(path)]

    def attach_reference(self, table: dict[str, tuple[float, float]]) -> None:
        # the pass skipped what did not load (data.bad_samples=skip; counted in the report): training skips them
        # too, and one that loads after all stops the run by name (__getitem__)
        missing = [self.records[i].get("id") for i in range(len(self)) if str(self.records[i].get("id")) not in table]
        if missing:
            log.warning("the precomputed reference log-probs lack %d sample(s) that did not load when they were "
                        "computed, e.g. %s: they are skipped in training as well", len(missing), missing[:3])
        self.reference = table

    def __getitem__(self, index: int) -> dict:
        sample = super().__getitem__(index)
        if self.reference is not None and "skip" not in sample:
            if sample["id"] not in self.reference:  # skipped during the reference pass, readable now
                raise ValueError(f"sample {sample['id']!r} has no precomputed reference log-probs (it could not be "
                                 f"loaded when they were computed): fix or remove it and delete the store in "
                                 f"dpo.reference_dir to compute them again")
            sample["reference"] = self.reference[sample["id"]]
        return sample

    def _load(self, record: dict, sample_id) -> dict:
        names = image_list(record)
        loaded = [self._load_image(name, sample_id, alone=len(names) == 1) for name in names]
        sizes = [size for _, size, _ in loaded]
        counts = image_token_counts(sizes, self.tokens_per_image, self.image_processor.anyres)
        sample, truncated = {"id": str(sample_id)}, False
        for side, (ids, labels) in zip(SIDES, tokenize_pair(record, self.tokenizer, self.template, len(names),
                                                             sample_id), strict=True):
            ids, labels, cut = fit_length(ids, labels, self.max_length, counts, self.overlong, sample_id)
            sample[f"{side}_ids"], sample[f"{side}_labels"] = torch.tensor(ids), torch.tensor(labels)
            truncated |= cut
        size = self.image_processor.size
        pixels = torch.cat([p for p, _, _ in loaded]) if loaded else torch.zeros(0, 3, size, size)
        return {**sample, "images": pixels, "image_sizes": sizes, "image_tokens": torch.tensor(counts, dtype=torch.long),
                "truncated": int(truncated), "converted": sum(c for _, _, c in loaded)}
