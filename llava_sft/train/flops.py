"""FLOPs of a training step, for MFU and HFU a GPU engineer would accept (issue 16: 6N of the LLM was all we counted).

Counted per step from the real batch, as `torch.utils.flop_counter.FlopCounterMode` counts (matrix products; norms,
activations and softmax are not FLOPs there), and checked against it (tests/test_flops.py, within 2 %):
  LLM, per real token T (padding excluded) with N = the decoder's linear weights (q, k, v, o, gate, up, down; LoRA
    adapters apart): forward 2N; backward 2N for the activation gradients (always: the projector's gradient flows
    through the LLM) + 2N for the weight gradients when the LLM's weights train (not Stage 1's frozen LLM, not
    LoRA's frozen base); LoRA adapters 2 forward + 4 backward per adapter weight.
  Attention, per sequence of length s (each sample of a packed row its own): Q K^T and A V, 4 s^2 x width per layer
    forward (the full square, as SDPA and FlopCounterMode count it; a causal kernel skips about half), backward 2x.
  LM head (model/loss.py: at supervised positions only): 2 x hidden x vocab per supervised token forward, the same
    for its input gradient, and again for its weight gradient when it trains.
  Projector, per image token: 2 x weights forward, 2 x weights for its weight gradients, 2 x weights of every layer
    but the first for the activation gradients (the tower's output needs none).
  Vision tower: measured once per image with FlopCounterMode on a blank image at start-up: its forward when frozen,
    forward + backward when it trains (train.train_vision_tower; the projector's first layer then needs its
    activation gradient too).
MFU counts this work; HFU adds what gradient checkpointing recomputes: the decoder layers' forward once more, less
each layer's last linear map (down_proj) under non-reentrant checkpointing, whose recompute stops once the last
tensor backward needs is rebuilt (torch.utils.checkpoint's early stop; the reentrant variant, used under ZeRO-3,
recomputes all of it).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)
from llava_sft.train.memory import GPUS


@dataclass(frozen=True)
class FlopModel:
    linear: int  # decoder linear weights (base weights, not LoRA adapters)
    lora: int  # LoRA adapter weights
    layers: int
    attention_width: int  # heads x head_dim
    head: int  # LM head weights (hidden x vocab)
    projector: int
    projector_first: int  # the projector's first linear map (no activation gradient needed)
    tower_per_image: float  # measured
    llm_weights_train: bool
    head_trains: bool
    projector_trains: bool
    tower_trains: bool
    recompute: int  # decoder linear weights recomputed by gradient checkpointing (0 = off)

    @classmethod
    def of(cls, model, checkpointing: bool, reentrant: bool = False) -> "FlopModel":
        """From a built LlavaModel, after set_trainable / add_lora (what trains decides the backward)."""
        llm, config = model.llm, model.llm.config
        head = llm.get_output_embeddings()
        linear = lora = 0
        llm_weights_train = False
        for name, module in llm.named_modules():
            if isinstance(module, nn.Linear) and module is not head:
                size = module.in_features * module.out_features
                if "lora_" in name:
                    lora += size
                else:
                    linear += size
                    llm_weights_train |= module.weight.requires_grad
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        maps = [m for m in model.projector.modules() if isinstance(m, nn.Linear)]
        return cls(linear=linear, lora=lora, layers=config.num_hidden_layers, attention_width=heads * head_dim,
                   head=head.in_features * head.out_features, projector=sum(m.in_features * m.out_features for m in maps),
                   projector_first=maps[0].in_features * maps[0].out_features if maps else 0,
                   tower_per_image=tower_flops_per_image(model.vision_tower), llm_weights_train=llm_weights_train,
                   head_trains=head.weight.requires_grad,
                   projector_trains=any(p.requires_grad for p in model.projector.parameters()),
                   tower_trains=any(p.requires_grad for p in model.vision_tower.parameters()),
                   recompute=(linear + lora - (0 if reentrant else last_linears(llm))) if checkpointing else 0)

    def step(self, lengths: list[int], supervised: int, images: int, image_tokens: int) -> tuple[float, float]:
        """(model FLOPs, hardware FLOPs) of one micro-batch's forward + backward: sequences of `lengths` real tokens
        (after image expansion), `supervised` labelled tokens, `images` images of `image_tokens` tokens each."""
        tokens, squares = sum(lengths), sum(s * s for s in lengths)
        linear_fwd = 2 * (self.linear + self.lora) * tokens
        attention_fwd = 4 * squares * self.attention_width * self.layers
        # backward through the LLM when something before or in it trains (Stage 1: only a batch with images)
        backward = self.llm_weights_train or self.lora > 0 or (
            (self.projector_trains or self.tower_trains) and images > 0)
        llm = linear_fwd + attention_fwd
        if backward:
            llm += 2 * self.linear * tokens * (2 if self.llm_weights_train else 1) + 4 * self.lora * tokens
            llm += 2 * attention_fwd
        head = 2 * self.head * supervised * (1 + backward + self.head_trains)
        n = images * image_tokens
        projector = 2 * self.projector * n
        if self.projector_trains:
            projector += 2 * self.projector * n
        if self.projector_trains or self.tower_trains:
            projector += 2 * (self.projector - self.projector_first) * n
        if self.tower_trains:
            projector += 2 * self.projector_first * n
        model = llm + head + projector + self.tower_per_image * images
        return float(model), float(model + (2 * self.recompute * tokens + attention_fwd if self.recompute else 0))


def last_linears(llm) -> int:
    """Weights of each decoder layer's last linear map (in registration order: down_proj for Llama-style MLPs)."""
    from llava_sft.model.loss import decoder_layers

    try:
        layers = decoder_layers(llm)
    except ValueError as err:  # an accounting detail must not stop a run: count no recompute saving, and say so
        log.warning("hardware FLOPs count the checkpointed layers' last linear maps as recomputed: %s", err)
        return 0
    total = 0
    for layer in layers:
        last = [m for n, m in layer.named_modules() if isinstance(m, nn.Linear) and "lora_" not in n][-1:]
        total += sum(m.in_features * m.out_features for m in last)
    return total


def tower_flops_per_image(tower) -> float:
    """FLOPs of the vision tower for one image, counted by FlopCounterMode (whatever the encoder): its forward, and
    when it trains (train.train_vision_tower) its backward too, as autograd runs it (no input gradient)."""
    from torch.utils.flop_counter import FlopCounterMode

    param = next(iter(tower.parameters()), None)
    buffer = next(iter(tower.buffers()), None)
    device = (param if param is not None else buffer).device if (param is not None or buffer is not None) else "cpu"
    trains = [p for p in tower.parameters() if p.requires_grad]
    grads = [p.grad for p in trains]
    counter = FlopCounterMode(display=False)
    with torch.set_grad_enabled(bool(trains)), counter:
        out = tower(torch.zeros(1, 3, tower.image_size, tower.image_size, device=device))
        if trains:
            out.float().sum().backward()
    for p, grad in zip(trains, grads, strict=True):  # leave no trace of the measurement
        p.grad = grad
    return float(counter.get_total_flops())


def sequence_lengths(batch: dict, tokens_per_image: int) -> list[int]:
    """Real tokens of each sequence after image expansion: each row of a padded batch, each sample of a packed row
    (its attention_mask holds segment ids 1, 2, ...; 0 = padding)."""
    from llava_sft.data.packing import image_extra

    ids, mask = batch["input_ids"], batch["attention_mask"]
    extra = image_extra(batch, tokens_per_image)
    lengths = []
    for row in range(ids.shape[0]):
        for segment in mask[row].unique().tolist():
            if segment:
                where = mask[row] == segment
                lengths.append(int(where.sum()) + int(extra[row][where].sum()))
    return lengths


def peak_flops(configured: float | None, device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of one device: train.flops_per_second_peak, else the GPU's from memory.GPUS."""
    if configured:
        return configured
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).upper()  # e.g. "NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3"
    return next((gpu.bf16_flops for gpu in GPUS.values() if gpu.name.split("-")[0] in name), None)
