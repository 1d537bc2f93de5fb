"""Attention that stays inside each sample of a packed row (the model side of data/packing.py).

A spliced packed batch (`SplicedBatch.segment_ids`: 0 = padding, k = k-th sample of the row, position ids
restarting at 0 at every sample) becomes the keyword arguments of the Hugging Face causal LM, by attention
implementation (`llm.config._attn_implementation`):

* flash attention (`flash_attention_2`/`_3`, or any implementation whose name contains "flash", e.g. a
  kernels-hub flash kernel, or "varlen", for one registered under a name transformers 5.x does not send to the
  kernels hub): padding-free. All real tokens of the micro-batch are flattened into one row
  [1, N] and `cu_seq_lens_q/k` + `max_length_q/k` (the sample boundaries) are passed with
  `attention_mask=None`; transformers 4.57 then calls `flash_attn_varlen_func`, whose causal attention is
  per sample. This is transformers' own padding-free path (as `DataCollatorWithFlattening` feeds it).
* `sdpa`: a 4-D boolean mask [B, 1, T, T], True where query q may attend key k: same sample and k <= q.
  transformers passes a 4-D mask through unchanged (`create_causal_mask` returns it as is) to
  `scaled_dot_product_attention`. Position ids alone would not isolate samples here.
* `eager`: the same mask as an additive float mask (0 / dtype min); any other implementation gets that too
  (untested: sdpa, eager and the varlen path are what tests/test_packing.py checks).

A padding slot attends only to itself, so no softmax row is empty (no NaN) and no real token sees it.
The labels are flattened with the inputs in the flash case: the caller shifts them as usual, and
data/packing.py has set the label of every sample's first token to IGNORE_INDEX, so no sample's
last token is trained to predict the next sample.
"""
from __future__ import annotations

import torch

from llava_sft.model.splice import SplicedBatch


def is_varlen(attn_implementation: str) -> bool:
    """Whether an attention implementation takes packed sequences as one flattened row + cu_seq_lens."""
    return "flash" in (attn_implementation or "") or "varlen" in (attn_implementation or "")


def block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] segment ids -> [B, 1, T, T] bool: q may attend k iff same sample and k <= q (padding: itself)."""
    T = segment_ids.shape[1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    real = segment_ids.ne(0)
    allowed = same & causal & real[:, None, :]
    allowed |= torch.eye(T, dtype=torch.bool, device=segment_ids.device) & ~real[:, :, None]
    return allowed[:, None]


def varlen_kwargs(position_ids: torch.Tensor) -> dict:
    """cu_seq_lens / max_length keyword arguments for one flattened row [1, N] of packed samples."""
    flat = position_ids.reshape(-1)
    starts = flat.eq(0).nonzero().reshape(-1)
    cu = torch.cat([starts, starts.new_tensor([flat.numel()])]).to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def llm_inputs(batch: SplicedBatch, attn_implementation: str) -> tuple[dict, torch.Tensor | None]:
    """(keyword arguments for the HF causal LM, labels aligned with its logits) for a spliced batch."""
    if batch.segment_ids is None:  # an ordinary padded batch
        return {"inputs_embeds": batch.inputs_embeds, "attention_mask": batch.attention_mask,
                "position_ids": batch.position_ids}, batch.labels
    if is_varlen(attn_implementation):
        keep = batch.segment_ids.ne(0)
        position_ids = batch.position_ids[keep][None]
        labels = batch.labels[keep][None] if batch.labels is not None else None
        return {"inputs_embeds": batch.inputs_embeds[keep][None], "attention_mask": None,
                "position_ids": position_ids, **varlen_kwargs(position_ids)}, labels
    mask = block_causal_mask(batch.segment_ids)
    if attn_implementation != "sdpa":
        dtype = batch.inputs_embeds.dtype
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return {"inputs_embeds": batch.inputs_embeds, "attention_mask": mask,
            "position_ids": batch.position_ids}, batch.labels
