"""The one place where `<image>` placeholders become image feature tokens.

`splice_images` takes padded token ids in which every image is a single IMAGE_TOKEN_INDEX and the
projected features of all images of the batch (in order of appearance, row by row: one [N, P, D] tensor, or a
list of [P_i, D] when images differ in token count, as AnyRes images do), and returns
the LLM inputs: embeddings with each placeholder replaced by that image's feature tokens, labels
set to IGNORE_INDEX at image positions, the attention mask and position ids. Text-only rows need
no image at all. It is vectorised (no Python loop over samples) and handles left or right padding.

Packed rows (data/packing.py): `attention_mask` may hold segment ids instead of 0/1 - 0 for padding,
k for the k-th sample of its (right-padded) row. When some row holds more than one sample, the
result also carries `segment_ids` (each output slot gets the id of its input position, image
tokens included) and the position ids restart at 0 at every sample; model/packed_attention.py then
keeps attention inside each sample.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from llava_sft.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX


@dataclass
class SplicedBatch:
    inputs_embeds: torch.Tensor  # [B, T, D]
    attention_mask: torch.Tensor  # [B, T] (1 = real token)
    position_ids: torch.Tensor  # [B, T] (restarting at 0 at every sample of a packed row)
    labels: torch.Tensor | None  # [B, T]
    segment_ids: torch.Tensor | None = None  # [B, T] packed rows only: 0 = padding, k = k-th sample of the row


def splice_images(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_features: torch.Tensor | list[torch.Tensor] | None,
    embed_tokens: torch.nn.Module,
    labels: torch.Tensor | None = None,
    padding_side: str = "right",
) -> SplicedBatch:
    """Replace each IMAGE_TOKEN_INDEX in `input_ids` by the matching image's features ([N, P, D] or [P_i, D] each)."""
    B, L = input_ids.shape
    valid = attention_mask.ne(0)
    packed = bool(attention_mask.numel()) and int(attention_mask.max()) > 1
    if packed and padding_side != "right":
        raise ValueError("packed rows (segment ids in attention_mask) must be right-padded")
    is_image = input_ids.eq(IMAGE_TOKEN_INDEX) & valid
    n_images = int(is_image.sum())
    n_given = 0 if image_features is None else len(image_features)
    if n_images != n_given:
        raise ValueError(f"batch has {n_images} image placeholder(s) but {n_given} image feature map(s)")
    if n_images:
        sizes = ([image_features.shape[1]] * image_features.shape[0] if torch.is_tensor(image_features)
                 else [f.shape[0] for f in image_features])
        counts = torch.tensor(sizes, device=input_ids.device)
        flat = image_features.flatten(0, 1) if torch.is_tensor(image_features) else torch.cat(list(image_features))
        total = flat.shape[0]  # known on the host: repeat_interleave need not sync a GPU to size its output
        img_b, img_t = is_image.nonzero(as_tuple=True)  # row-major = order of appearance
        per_position = torch.zeros_like(input_ids)
        per_position[img_b, img_t] = counts

    # Each input position occupies 1 output slot (text) or P_i slots (image i); padding occupies none.
    width = (torch.where(is_image, per_position, 1) if n_images else torch.ones_like(input_ids)) * valid
    lengths = width.sum(dim=1)
    T = int(lengths.max())
    start = width.cumsum(dim=1) - width  # first output slot of each input position
    if padding_side == "left":
        start = start + (T - lengths)[:, None]
    elif padding_side != "right":
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")

    text_b, text_t = (valid & ~is_image).nonzero(as_tuple=True)
    text_embeds = embed_tokens(input_ids[text_b, text_t])
    embeds = text_embeds.new_zeros(B, T, text_embeds.shape[-1])
    embeds[text_b, start[text_b, text_t]] = text_embeds
    new_labels = None
    if labels is not None:
        new_labels = labels.new_full((B, T), IGNORE_INDEX)
        new_labels[text_b, start[text_b, text_t]] = labels[text_b, text_t]
    if n_images:  # image i's tokens go to slots start_i, start_i + 1, ..., start_i + P_i - 1 of its row
        rows = img_b.repeat_interleave(counts, output_size=total)
        offsets = (torch.arange(total, device=input_ids.device)
                   - (counts.cumsum(0) - counts).repeat_interleave(counts, output_size=total))
        slots = start[img_b, img_t].repeat_interleave(counts, output_size=total) + offsets
        embeds[rows, slots] = flat.to(embeds.dtype)

    slot = torch.arange(T, device=input_ids.device)[None, :]
    first = (T - lengths)[:, None] if padding_side == "left" else torch.zeros_like(lengths)[:, None]
    new_mask = (slot >= first) & (slot < first + lengths[:, None])
    if not packed:
        position_ids = (slot - first).clamp(min=0) * new_mask
        return SplicedBatch(embeds, new_mask.long(), position_ids, new_labels)

    segments = attention_mask.new_zeros(B, T)
    segments[text_b, start[text_b, text_t]] = attention_mask[text_b, text_t]
    if n_images:
        segments[rows, slots] = attention_mask[img_b, img_t].repeat_interleave(counts, output_size=total)
    # a sample starts where the segment id changes; its positions count from that slot
    changes = torch.ones_like(segments, dtype=torch.bool)
    changes[:, 1:] = segments[:, 1:] != segments[:, :-1]
    sample_start = torch.where(changes, slot, 0).cummax(dim=1).values
    position_ids = (slot - sample_start) * new_mask
    return SplicedBatch(embeds, new_mask.long(), position_ids, new_labels, segments)
