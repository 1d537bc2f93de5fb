"""Preflight's instruments inside a real training run: facts measured during the steps, not read from flags.

Off unless the environment variable LLAVA_SFT_PROBE names a file (`python -m llava_sft.preflight` sets it for the
rehearsal it launches); each rank then writes `<file>.rank<R>` (JSON) when training ends. What it records:

* modes: during the first forward pass, whether the LLM is in training mode, the vision tower in eval mode, and
  how many of the LLM's dropout modules with p > 0 are active;
* gradient checkpointing: the bytes autograd saves for backward inside the LLM's decoder during the first
  micro-batch, and the same micro-batch once more with checkpointing flipped (after step 1, a forward whose graph
  is dropped): a non-reentrant checkpoint keeps its layers' tensors out of the outer saved-tensor hooks, so with
  checkpointing really on the ratio is far below 1 -- and exactly 1 when it is a no-op;
* trainable parameters per module (names and counts; ZeRO-3 partitions counted whole) and the dtype of what the
  optimizer steps (DeepSpeed's fp32 partitions, or the parameters themselves);
* frozen parameters' bytes hashed before the first step and after the last (each rank its own partition).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

ENV = "LLAVA_SFT_PROBE"


def decoder_of(llm: torch.nn.Module) -> torch.nn.Module:
    """The LLM's decoder stack (the module whose layers gradient checkpointing wraps), also under peft."""
    from llava_sft.model.loss import decoder

    return decoder(llm)


def _local(p: torch.Tensor) -> torch.Tensor:
    if hasattr(p, "to_local"):  # FSDP2: this rank's shard
        return p.to_local()
    return getattr(p, "ds_tensor", p)  # ZeRO-3: this rank's partition


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha1(_local(t).detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


class SavedBytes:
    """Counts the bytes of the tensors autograd saves for backward while active (each storage once)."""

    def __init__(self):
        self.bytes, self._seen, self._ctx = 0, set(), None

    def _pack(self, t: torch.Tensor):
        try:
            key = t.untyped_storage().data_ptr()
            if key not in self._seen:
                self._seen.add(key)
                self.bytes += t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


class Probe:
    def __init__(self, path: str, rank: int):
        self.path, self.rank = Path(f"{path}.rank{rank}"), rank
        self.facts: dict = {}
        self._model = None
        self._first_inputs = None
        self._counter: SavedBytes | None = None
        self._hashes: dict[str, str] = {}

    @classmethod
    def from_env(cls, rank: int) -> "Probe | None":
        path = os.environ.get(ENV)
        return cls(path, rank) if path else None

    # ------------------------------------------------------------------ setup
    def on_setup(self, model, optimizer, engine, checkpointing: bool, reentrant: bool = False) -> None:
        from llava_sft.model.llava import numel

        self._model, self._reentrant = model, reentrant
        modules = {"vision_tower": model.vision_tower, "projector": model.projector, "llm": model.llm}
        self.facts["trainable"] = {
            name: {"trainable": sum(numel(p) for p in m.parameters() if p.requires_grad),
                   "total": sum(numel(p) for p in m.parameters()),
                   "trainable_names": sorted(n for n, p in m.named_parameters() if p.requires_grad)}
            for name, m in modules.items()}
        self.facts["gradient_checkpointing"] = {"configured": checkpointing, "reentrant": reentrant}
        self.facts["master_dtypes"] = sorted({str(t.dtype).replace("torch.", "") for t in
                                              _stepped_tensors(optimizer, engine)})
        # the vision tower's weights are buffers under ZeRO-3 and FSDP2 (engines.base.params_to_buffers): hash its state dict
        frozen = {f"llm.{n}": p for n, p in model.llm.named_parameters() if not p.requires_grad}
        frozen.update({f"projector.{n}": p for n, p in model.projector.named_parameters() if not p.requires_grad})
        if not model.vision_tower_trains:  # (train.train_vision_tower; refused where the tower is buffers)
            frozen.update({f"vision_tower.{n}": t for n, t in model.vision_tower.state_dict().items()})
        self._frozen = frozen
        self._hashes = {n: _digest(t) for n, t in frozen.items()}
        model.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        decoder = decoder_of(model.llm)
        decoder.register_forward_pre_hook(self._decoder_in)
        decoder.register_forward_hook(self._decoder_out)

    def _before_forward(self, module, args, kwargs):
        if "modes" in self.facts or not torch.is_grad_enabled():  # a training step's forward, not DPO's reference pass
            return
        llm = module.llm
        dropouts = [m for m in llm.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
        self.facts["modes"] = {
            "llm_training": llm.training, "vision_tower_training": module.vision_tower.training,
            "projector_training": module.projector.training,
            "llm_modules_in_eval": sum(not m.training for m in llm.modules()),
            "dropout_modules": len(dropouts), "dropout_active": sum(m.training for m in dropouts)}
        self._first_inputs = (args, kwargs)
        self._counter = SavedBytes()

    def _decoder_in(self, module, args):
        if self._counter is not None:
            self._counter.__enter__()

    def _decoder_out(self, module, args, output):
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            key = "saved_bytes" if "saved_bytes" not in self.facts["gradient_checkpointing"] else "saved_bytes_flipped"
            self.facts["gradient_checkpointing"][key] = self._counter.bytes
            self._counter = None

    # ------------------------------------------------------------------ steps
    def after_step(self, step: int) -> None:
        """After step 1: the first micro-batch once more with checkpointing flipped (graph dropped, no backward)."""
        if step != 1 or self._first_inputs is None:
            return
        model, (args, kwargs) = self._model, self._first_inputs
        self._first_inputs = None
        base = model.llm.get_base_model() if hasattr(model.llm, "get_base_model") else model.llm
        on = bool(getattr(base, "is_gradient_checkpointing", False))
        gc_kwargs = {"use_reentrant": self._reentrant}
        if on:
            base.gradient_checkpointing_disable()
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
        self._counter = SavedBytes()
        try:
            with torch.enable_grad():
                out = model(*args, **kwargs)
            del out
        finally:
            if on:
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
            else:
                base.gradient_checkpointing_disable()
            self._counter = None

    def on_end(self) -> None:
        changed = [n for n, t in self._frozen.items() if _digest(t) != self._hashes[n]]
        self.facts["frozen"] = {"tensors": len(self._hashes), "changed": changed}
        self.path.write_text(json.dumps(self.facts, indent=1))


def _stepped_tensors(optimizer, engine) -> list[torch.Tensor]:
    """The tensors the optimizer updates: DeepSpeed ZeRO's fp32 partitions (stage 1/2: single_partition_of_fp32_groups,
    stage 3: fp32_partitioned_groups_flat), or the parameters of a plain torch optimizer."""
    if engine is not None and engine.name == "deepspeed":
        zero = engine.module.optimizer
        for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
            if getattr(zero, attr, None):
                return [t for t in getattr(zero, attr) if t is not None]
        raise RuntimeError(f"cannot find the fp32 partitions of {type(zero).__name__}")
    return [p for group in optimizer.param_groups for p in group["params"]]
