"""Padding-free packing: which samples share a row, and the packed batch layout (`data.packing: true`).

The batch plan is unchanged: a global batch is the same `train.global_batch_size` samples, and each rank
gets the same share of it, as without packing. With packing a rank's whole share is loaded at once and
packed into rows of at most `data.pack_max_tokens` tokens, counted after image expansion (an image's
tokens are never split: a sample is placed whole; a sample longer than the budget was already cut or
dropped by the over-long policy, the dataset's max length being min(max_length, pack_max_tokens)).
There are as many rows as first-fit decreasing needs, filled evenly (so that rows sharing a
micro-batch pad little; deterministic), and `train.micro_batch_size` consecutive rows, longest
first, form one micro-batch (one forward pass), so the number of micro-batches of a step varies
with the sample lengths.

Layout of a packed micro-batch (what `Collator` gives, with two differences):
  attention_mask  segment ids, 0 = padding, k = the k-th sample of the row (a 0/1 mask is the unpacked case)
  labels          the label of each sample's first token is IGNORE_INDEX: unpacked, the first token is
                  never a target; packed, it would be the target of the previous sample's last token
  images          in order of appearance, row by row
splice_images turns the segment ids into per-sample position ids (restarting at 0) and the model keeps
attention inside each sample (model/packed_attention.py). The supervised tokens, and so the
token-normalised loss of the step, are exactly those of the unpacked batch.
"""
from __future__ import annotations

import torch

from llava_sft.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava_sft.data.dataset import image_fields, unit_fields


def expanded_length(input_ids: torch.Tensor, image_tokens) -> int:
    """Sequence length of one sample after each image placeholder becomes its feature tokens (`image_tokens`: one
    count for every image, or a tensor with each image's: AnyRes)."""
    n = int(input_ids.eq(IMAGE_TOKEN_INDEX).sum())
    extra = (image_tokens - 1) * n if isinstance(image_tokens, int) else int((image_tokens - 1).sum())
    return len(input_ids) + extra


def image_extra(batch: dict, tokens_per_image: int) -> torch.Tensor:
    """[B, L]: at each real image placeholder, the tokens it adds when expanded (its count - 1); else 0. Counts
    from the batch's `image_tokens` (in order of appearance, row-major), else `tokens_per_image` each."""
    ids = batch["input_ids"]
    is_image = ids.eq(IMAGE_TOKEN_INDEX) & batch["attention_mask"].ne(0)
    extra = torch.zeros_like(ids)
    counts = batch.get("image_tokens")
    extra[is_image] = (counts.to(ids.device) - 1) if counts is not None else tokens_per_image - 1
    return extra


def pack_rows(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices of `lengths` grouped into rows whose lengths sum to <= budget, longest row first: as few rows
    as first-fit decreasing needs, filled evenly where that fits in as many rows (longest sample first into
    the emptiest row with room), else the first-fit decreasing rows. Deterministic (ties by index)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    too_long = [lengths[i] for i in order if lengths[i] > budget]
    if too_long:
        raise ValueError(f"a sample of {too_long[0]} tokens does not fit data.pack_max_tokens={budget}")
    fewest = _fill(order, lengths, budget, evenly=False)
    even = _fill(order, lengths, budget, evenly=True, n_rows=len(fewest))
    rows = even if len(even) == len(fewest) else fewest
    load = [sum(lengths[i] for i in row) for row in rows]
    return [rows[r] for r in sorted(range(len(rows)), key=lambda r: (-load[r], r))]


def _fill(order: list[int], lengths: list[int], budget: int, evenly: bool, n_rows: int = 0) -> list[list[int]]:
    """Samples in `order` into rows: the first row with room (first fit), or the emptiest with room (evenly,
    starting from `n_rows` empty rows); a new row when none has room."""
    rows: list[list[int]] = [[] for _ in range(n_rows)]
    load = [0] * n_rows
    for i in order:
        fits = [r for r in range(len(rows)) if load[r] + lengths[i] <= budget]
        if not fits:
            rows.append([])
            load.append(0)
            fits = [len(rows) - 1]
        row = min(fits, key=lambda r: (load[r], r)) if evenly else fits[0]
        rows[row].append(i)
        load[row] += lengths[i]
    return [row for row in rows if row]


class PackingCollator:
    """A rank's share of one global batch -> the list of its packed micro-batches (see module docstring). With
    `split` (data/preference.py's pair_sides) a sample is a unit of several sequences packed together, in order,
    into one row: a preference pair's two sides are always in the same micro-batch."""

    def __init__(self, pad_token_id: int, tokens_per_image: int, max_tokens: int, rows_per_micro_batch: int,
                 split=None):
        if max_tokens < 1 or rows_per_micro_batch < 1:
            raise ValueError("pack_max_tokens and micro_batch_size must be positive")
        self.pad_token_id, self.tokens_per_image = pad_token_id, tokens_per_image
        self.max_tokens, self.rows_per_micro_batch, self.split = max_tokens, rows_per_micro_batch, split

    def __call__(self, samples: list[dict]) -> list[dict]:
        kept = [s for s in samples if "skip" not in s]
        report = {"skipped": [(s["id"], s["skip"]) for s in samples if "skip" in s],
                  "truncated": sum(s["truncated"] for s in kept), "converted": sum(s.get("converted", 0) for s in kept)}
        units = [self.split(s) for s in kept] if self.split else [[s] for s in kept]
        rows = pack_rows([sum(expanded_length(s["input_ids"], s.get("image_tokens", self.tokens_per_image))
                              for s in unit) for unit in units], self.max_tokens)
        groups = [rows[i:i + self.rows_per_micro_batch] for i in range(0, len(rows), self.rows_per_micro_batch)]
        micro = [self.collate_rows([[s for i in row for s in units[i]] for row in group],
                                   [kept[i]["id"] for row in group for i in row]) for group in groups]
        if not micro:  # every sample was skipped
            micro = [{"ids": []}]
        micro[0].update(report)  # reported once per step
        for batch in micro[1:]:
            batch.update(skipped=[], truncated=0, converted=0)
        return micro

    def collate_rows(self, rows: list[list[dict]], ids: list | None = None) -> dict:
        """Rows of samples -> one packed micro-batch (`ids`: of its units, when a unit is several samples)."""
        width = max(sum(len(s["input_ids"]) for s in row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        segments = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            at = 0
            for k, s in enumerate(row, start=1):
                n = len(s["input_ids"])
                input_ids[r, at:at + n], labels[r, at:at + n], segments[r, at:at + n] = s["input_ids"], s["labels"], k
                labels[r, at] = IGNORE_INDEX
                at += n
        flat = [s for row in rows for s in row]
        return {"input_ids": input_ids, "labels": labels, "attention_mask": segments, **image_fields(flat),
                "ids": [s["id"] for s in flat] if ids is None else ids,
                **unit_fields(flat, len(ids) if self.split and ids is not None else None)}


def token_counts(batch: dict, tokens_per_image: int) -> tuple[int, int]:
    """(real tokens, token slots) of a padded or packed batch after image expansion: slots = rows x the
    longest row, what attention and the MLPs compute on (the flash path drops a packed batch's padding)."""
    if "input_ids" not in batch or not batch["ids"]:
        return 0, 0
    real = batch["attention_mask"].ne(0)
    per_row = real.sum(dim=1) + image_extra(batch, tokens_per_image).sum(dim=1)
    return int(per_row.sum()), int(per_row.max()) * per_row.numel()
