"""The engine protocol: what the training loop asks of DDP, DeepSpeed ZeRO and FSDP2 (one file each beside this).

The loop (train/trainer.py) owns the data, the loss normalisation and the run's bookkeeping; an engine owns how the
model is distributed and stepped:

    engine.init_distributed(cuda)          the process group (and device mesh), from the torchrun environment
    engine.before_model_build()            ZeRO-3: HF models built from now on load partitioned
    engine.setup(model, make_groups, lr_lambda)
                                           wrap the model, build AdamW over make_groups(model) and the schedule
    engine.align(micro)                    the micro-batches to run, no-op batches added where collectives need them
    with engine.accumulating(last):        one micro-batch: forward through engine.module, then
        engine.backward(loss)              backward of (its summed token loss x world / global supervised tokens)
    engine.step(check)                     clip, optimizer, schedule; check(grad_norm, applied) may stop the run
    engine.checkpoint_state(model)         rank 0's part of a periodic checkpoint (weights too, where they are whole)
    engine.write_checkpoint(directory)     collective: the engine's own sharded files, or nothing
    engine.restore(state, directory, model)
    engine.full_state_dict(model, rank)    collective: the whole model on rank 0 for the final save (None: the
                                           modules' own weights are whole)

Every engine divides nothing itself: DDP, ZeRO and FSDP2 average gradients over ranks, so the loop scales each
micro-batch's loss by world / (global supervised tokens) and accumulation equals one large batch exactly.
"""
from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable

import torch

from llava_sft.constants import IGNORE_INDEX
from llava_sft.model.loss import decoder_layers  # noqa: F401 (re-exported: the engines shard and compile them)
from llava_sft.train.collectives import max_over_ranks

StepCheck = Callable[[float, bool], None]  # (gradient norm, whether the step was already applied)


def no_op_batch() -> dict:
    """One text token with no supervised label: a forward/backward that contributes exactly zero."""
    return {"input_ids": torch.zeros(1, 1, dtype=torch.long), "attention_mask": torch.ones(1, 1, dtype=torch.long),
            "labels": torch.full((1, 1), IGNORE_INDEX), "images": torch.zeros(0, 3, 1, 1), "image_sizes": [],
            "image_tokens": torch.zeros(0, dtype=torch.long), "ids": []}


class Engine:
    name = "base"
    checkpoint_name = "base"  # the "engine" recorded in a checkpoint's state.pt: a resume must use the same
    keeps_fp32_masters = False  # may trainable weights be 16-bit (the engine steps fp32 copies)?
    reentrant_checkpointing = False  # gradient checkpointing variant (ZeRO-3 needs the reentrant one)
    equal_forward_passes = False  # collectives inside forward: every rank must run as many forward passes

    def __init__(self, train_cfg, world: int, rank: int):
        self.train_cfg, self.world, self.rank = train_cfg, world, rank
        self.model = self.module = self.optimizer = self.scheduler = None

    # --------------------------------------------------------------------------------------- set-up
    def init_distributed(self, cuda: bool) -> None:
        raise NotImplementedError

    @staticmethod
    def lone_process_environment() -> None:
        """`python -m llava_sft.train` without torchrun: the environment of a 1-rank group on a free local port, for
        the engines whose process group is needed even alone (DeepSpeed, FSDP2)."""
        if "WORLD_SIZE" in os.environ:
            return
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(port))

    @staticmethod
    def name_the_device_for_deepspeed(cuda: bool) -> None:
        """transformers imports accelerate, which imports DeepSpeed whenever it is installed, and saving a model asks
        DeepSpeed for its accelerator: on a machine without a GPU that logged "Setting accelerator to CPU. If you
        have GPU ... we were unable to detect it" in runs that use no DeepSpeed at all. Naming the device spares
        the detection (a value the user set is kept)."""
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if cuda else "cpu")

    def before_model_build(self) -> None:
        pass

    def text_only_anchor(self) -> str:
        """What a text-only micro-batch must run (LlavaModel._text_only_anchor): with several ranks every trainable
        parameter needs a gradient; one process needs nothing."""
        return "params" if self.world > 1 else "none"

    def autocast(self, device: torch.device) -> bool:
        """bf16 autocast around the forward pass (on a GPU, with train.bf16)."""
        return device.type == "cuda" and self.train_cfg.bf16

    def setup(self, model, make_groups: Callable, lr_lambda: Callable) -> None:
        raise NotImplementedError

    def prepare_frozen(self, module):
        """A frozen model beside the trained one (DPO's reference copy), distributed as this engine distributes
        (ZeRO-3, FSDP2: sharded); -> what to call. DDP: whole on every rank, as it is."""
        module.text_only_anchor = "none"  # no gradients, no collectives in its forward
        return module

    def adamw(self, groups: list[dict]) -> torch.optim.Optimizer:
        t = self.train_cfg
        return torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps)

    # ------------------------------------------------------------------------------------------ steps
    def align(self, micro: list[dict]) -> list[dict]:
        """The micro-batches this rank runs: a micro-batch whose samples were all skipped has no "input_ids". Where
        forward passes issue collectives (ZeRO, FSDP2) it becomes a no-op batch and every rank runs as many as the
        busiest; under DDP a rank with nothing left still joins the gradient all-reduce with one no-op batch."""
        if self.equal_forward_passes:
            micro = [b if "input_ids" in b else no_op_batch() for b in micro]
            most = max_over_ranks([len(micro)], self.world)[0]
            micro += [no_op_batch() for _ in range(int(most) - len(micro))]
            return micro
        micro = [b for b in micro if "input_ids" in b]
        return micro or ([no_op_batch()] if self.world > 1 else [])

    def accumulating(self, last: bool):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def step(self, check: StepCheck) -> float:
        """Clip, check, AdamW, schedule (the engines whose gradients are plain or DTensor `.grad`s)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        for p in params:  # unused this step (the projector, when every micro-batch was text-only): a zero gradient,
            if p.grad is None:  # as DDP and ZeRO give it -- AdamW skips a None gradient but moves on momentum for a 0
                p.grad = torch.zeros_like(p)
        if self.train_cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.train_cfg.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if params else torch.zeros(())
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP2: a DTensor
        check(norm, False)  # gradients are synchronised: every rank sees the same norm
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    # ------------------------------------------------------------------------------------ checkpoints
    def checkpoint_state(self, model) -> dict:
        raise NotImplementedError

    def write_checkpoint(self, directory) -> None:
        pass

    def restore(self, state: dict, directory, model) -> None:
        raise NotImplementedError

    def full_state_dict(self, model, rank: int) -> dict | None:
        return None

    def check_resumable(self, state: dict, path, model) -> None:
        """The checkpoint was written by this engine and holds the parameters that train now."""
        written = state.get("engine", "torch")
        if written != self.checkpoint_name:
            raise ValueError(f"cannot resume from {path}: it was written by the {written} engine and this run uses "
                             f"{self.checkpoint_name} (set train.engine / train.deepspeed as they were, or use "
                             f"train.resume=never)")
        named = {n for n, p in model.named_parameters() if p.requires_grad}
        saved = set(state["trainable_names"] if "trainable_names" in state else state["trainable"])
        if named != saved:
            raise ValueError(f"cannot resume from {path}: trainable parameters differ (not in checkpoint: "
                             f"{sorted(named - saved)[:5]}, not trainable now: {sorted(saved - named)[:5]})")


def params_to_buffers(module: torch.nn.Module) -> None:
    """Turn a frozen module's parameters into (persistent) buffers of the same names: ZeRO and FSDP2
    leave them whole on every rank (it is frozen, and open_clip reads some of its weights outside sub-module calls)."""
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is None:
                continue
            if p.requires_grad:
                raise ValueError(f"{type(sub).__name__}.{name} trains: only frozen modules can be kept whole")
            del sub._parameters[name]
            sub.register_buffer(name, p.data, persistent=True)


def compile_decoder_layers(llm: torch.nn.Module) -> int:
    """train.compile: torch.compile each decoder layer in place (the layers are where the time goes; compiling
    layer by layer keeps graphs small and lets FSDP2 shard the compiled modules)."""
    layers = decoder_layers(llm)
    for layer in layers:
        layer.compile()
    return len(layers)
