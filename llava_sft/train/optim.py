"""What every engine's optimizer shares: AdamW's parameter groups, the learning-rate schedule, and the rule that
16-bit weights need an engine that keeps fp32 master copies."""
from __future__ import annotations

import math

import torch


def lr_lambda(total_steps: int, warmup_ratio: float, schedule: str):
    """LR factor per optimizer step, exactly HF Trainer's (LLaVA's reference runs): warmup steps =
    ceil(total x warmup_ratio) (TrainingArguments.get_warmup_steps), then transformers'
    get_cosine_schedule_with_warmup / get_constant_schedule_with_warmup -- whose step 0 has LR 0: the first
    optimizer step only initialises Adam's moments (tests/test_train_mode.py compares with transformers)."""
    warmup = math.ceil(total_steps * warmup_ratio)

    def factor(step: int) -> float:  # step = number of optimizer steps already taken
        if step < warmup:
            return step / max(1, warmup)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    if schedule not in ("cosine", "constant"):
        raise ValueError(f"train.lr_schedule must be 'cosine' or 'constant', got {schedule!r}")
    return factor


def param_groups(model: torch.nn.Module, weight_decay: float, lr: float, projector_lr: float | None = None,
                 vision_tower_lr: float | None = None) -> list[dict]:
    """Weight decay on matrices only (not on biases and norm weights), as HF Trainer / LLaVA; the projector and
    a trained vision tower may have their own learning rates (LLaVA's mm_projector_lr, LLaVA-NeXT's
    mm_vision_tower_lr). AnyRes's `image_newline` (1-D) gets none; HF Trainer would decay it (it is not a norm
    weight or a bias), which changes nothing in LLaVA-NeXT's recipes (weight decay 0)."""
    own_lr = {"projector.": projector_lr or lr, "vision_tower.": vision_tower_lr or lr}
    groups: dict[tuple[str, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            part = next((prefix for prefix in own_lr if name.startswith(prefix)), "")
            groups.setdefault((part, p.ndim >= 2), []).append(p)
    return [{"params": params, "weight_decay": weight_decay if decay else 0.0, "lr": own_lr.get(part, lr)}
            for (part, decay), params in sorted(groups.items())]


def check_master_weights(model: torch.nn.Module, engine_keeps_masters: bool) -> None:
    """Refuse trainable 16-bit parameters that AdamW would update in place: bf16 keeps 8 significant bits, so an
    update smaller than 2^-9 of a weight (lr 2e-5 x Adam's ~unit step, against weights of ~1e-2) rounds away --
    in a 10-step check ~70 % of the weights never changed. DeepSpeed ZeRO (every stage) steps fp32 partitions and
    FSDP2 upcasts before sharding, so DDP is the engine that may not hold 16-bit trainable weights."""
    if engine_keeps_masters:
        return
    low = [(n, p.dtype) for n, p in model.named_parameters() if p.requires_grad and p.dtype != torch.float32]
    if low:
        dtypes = ", ".join(sorted({str(d).replace("torch.", "") for _, d in low}))
        raise ValueError(
            f"{len(low)} trainable parameter tensors are {dtypes} (e.g. {low[0][0]}) and no engine keeps fp32 master "
            f"weights: AdamW would update them in place and most updates at small learning rates round away. Fix: "
            f"train under DeepSpeed (train.deepspeed=configs/deepspeed/zero2.json or zero3.json) or FSDP2 "
            f"(train.engine=fsdp2), which keep fp32 masters, or load the LLM in fp32 (model.llm.dtype=float32; "
            f"train.bf16=true still computes in bf16 on a GPU)")
