"""The training loss: the LM head and cross-entropy only where a label is, in chunks.

A Stage-1 row at the LLaVA-1.5 geometry is 576 image tokens and a ~30-token caption: 3 % of its positions carry a
label. Computing `llm(...).logits` for every position, then an fp32 copy for the cross-entropy, is
`[tokens, vocab]` twice over (32,000 vocabulary): a tiny-width Stage-1 step at micro-batch 16 peaked at 4.9 GB,
almost all logits (issue 16; Liger-Kernel #1308 reports ~64 GiB of fp32 logits at 7B; Molmo2 trains with
`response_logits_only`). Here the decoder gives hidden states, the rows whose next token is supervised are
gathered, the LM head runs on those rows only (one module call, as ZeRO-3's parameter hooks expect), and the
fp32 cross-entropy runs over them in chunks that are recomputed in backward, so at most one chunk of fp32
log-probabilities exists at a time. Loss and gradients equal the full computation (tests/test_loss.py).

LLMs that transform the logits after the LM head (Gemma-2's soft-capping, Cohere's logit scale, Granite's
scaling) are computed in full, with a warning naming the setting: this module does not know each transform.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from llava_sft.constants import IGNORE_INDEX

log = logging.getLogger(__name__)

CHUNK_ROWS = 2048  # rows of fp32 log-probabilities alive at once: 2048 x 32,000 x 4 B = 250 MiB
# config attributes of HF LLMs whose forward changes the logits after the LM head (value meaning "no change")
LOGIT_TRANSFORMS = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0}
_warned: set[str] = set()


def logit_transform(config) -> str | None:
    """The setting by which this LLM's forward transforms its logits after the LM head, or None."""
    for name, neutral in LOGIT_TRANSFORMS.items():
        value = getattr(config, name, None)
        if value is not None and value != neutral:
            return f"{name}={value}"
    return None


def loss_sum(llm, kwargs: dict, labels: torch.Tensor, supervised_only: bool = True):
    """(sum of the next-token losses over supervised positions, number of them) for HF causal-LM inputs `kwargs`
    (model/packed_attention.py: llm_inputs) and labels aligned with them (unshifted)."""
    targets = labels[:, 1:]
    count = targets.ne(IGNORE_INDEX).sum()
    if not supervised_only or logit_transform(llm.config):  # every position's logits, as HF's own loss does
        if supervised_only:
            _warn_transform(llm)
        logits = llm(**kwargs, use_cache=False).logits[:, :-1].float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum"), count
    logits, wanted = supervised_logits(llm, kwargs, labels)
    if logits.shape[0] == 0:  # nothing supervised here (a padding-only share): a zero that reaches the LM head
        return logits.sum() * 0.0, count
    total = None
    for start in range(0, logits.shape[0], CHUNK_ROWS):
        part = checkpoint(_chunk_loss, logits[start:start + CHUNK_ROWS], wanted[start:start + CHUNK_ROWS],
                          use_reentrant=False)
        total = part if total is None else total + part
    return total, count


def supervised_logps(llm, kwargs: dict, labels: torch.Tensor, supervised_only: bool = True) -> torch.Tensor:
    """The fp32 log-probability of every supervised next token, in the order of the positions (row by row): what a
    preference loss sums per sequence (model/dpo.py). The same LM-head-on-supervised-rows path and chunks as
    `loss_sum` (whose summed loss is minus their sum)."""
    logits, wanted = supervised_logits(llm, kwargs, labels, supervised_only)
    if logits.shape[0] == 0:
        return (logits.sum() * 0.0).float().reshape(1)[:0]
    return torch.cat([checkpoint(_chunk_logps, logits[start:start + CHUNK_ROWS], wanted[start:start + CHUNK_ROWS],
                                 use_reentrant=False) for start in range(0, logits.shape[0], CHUNK_ROWS)])


def supervised_logits(llm, kwargs: dict, labels: torch.Tensor, supervised_only: bool = True):
    """(logits [supervised positions, vocab] in the LLM's dtype, their target ids): the LM head on the supervised
    rows only, unless `supervised_only` is False or the LLM transforms its logits (then every position is computed
    and the supervised rows are taken afterwards)."""
    targets = labels[:, 1:]
    keep = targets.ne(IGNORE_INDEX)
    transform = logit_transform(llm.config)
    if transform and supervised_only:
        _warn_transform(llm)
    if not supervised_only or transform:
        return llm(**kwargs, use_cache=False).logits[:, :-1][keep], targets[keep]
    hidden = decoder(llm)(**kwargs, use_cache=False).last_hidden_state[:, :-1]
    return llm.get_output_embeddings()(hidden[keep]), targets[keep]  # [supervised rows, vocab]


def _warn_transform(llm) -> None:
    transform = logit_transform(llm.config)
    if transform not in _warned:
        _warned.add(transform)
        log.warning("%s transforms its logits after the LM head (%s): computing the logits at every position",
                    type(llm).__name__, transform)


def _chunk_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def _chunk_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -F.cross_entropy(logits.float(), targets, reduction="none")


def decoder(llm):
    """The decoder stack under the LM head: LlamaModel under LlamaForCausalLM, GPT2Model under GPT2LMHeadModel;
    through a peft wrapper too. transformers 4.57's `get_decoder()` looks for `.decoder` / `.model` and otherwise
    returns the model itself: for a family that keeps its stack elsewhere (GPT-2, Falcon, Bloom: `.transformer`)
    that is the LM with its head, whose output has no `last_hidden_state`. The stack is then the attribute the
    family names in `base_model_prefix`."""
    base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    get = getattr(base, "get_decoder", None)
    model = get() if get is not None else None
    if model is None or model is base:
        model = getattr(base, getattr(base, "base_model_prefix", "model"), None)
    if model is None or model is base:
        raise ValueError(f"{type(base).__name__}: cannot find the decoder stack under the LM head (neither "
                         f"get_decoder() nor .{getattr(base, 'base_model_prefix', 'model')} gives it)")
    return model


def decoder_layers(llm) -> list:
    """The decoder stack's layers: `.layers` (Llama, Qwen, Mistral, Gemma, GPT-NeoX, OPT's decoder), `.h` (GPT-2,
    Falcon, Bloom) or `.blocks` (MPT)."""
    stack = decoder(llm)
    layers = getattr(stack, "layers", None) or getattr(stack, "h", None) or getattr(stack, "blocks", None)
    if not layers:
        raise ValueError(f"{type(stack).__name__} keeps its layers in none of .layers, .h, .blocks")
    return list(layers)
