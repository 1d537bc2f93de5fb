"""FSDP2 (`train.engine: fsdp2`): PyTorch's `fully_shard` per decoder layer, then the rest of the model as one group.

* Sharding: every trainable and frozen LLM / projector parameter becomes a DTensor shard (1/world of it per rank);
  a decoder layer's weights are all-gathered for its forward and again for its backward, then freed. The frozen
  vision tower is kept whole on every rank (as buffers, as under ZeRO-3). `train.fsdp_shard_size: N` (HSDP) shards
  within groups of N ranks -- a node, typically -- and replicates across them: all-gathers stay on the fast links.
* Precision: parameters are upcast to fp32 before sharding, so the optimizer steps fp32 master weights. On a GPU
  with train.bf16 the forward and backward compute in bf16 (MixedPrecisionPolicy: bf16 parameters as gathered) and
  gradients are reduced in fp32. The final model is saved in the dtype each parameter was loaded in.
* Checkpoints: the trainable weights and AdamW's states as sharded `torch.distributed.checkpoint` files in
  step_N/fsdp2/ (every rank writes its shards), the schedule in rank 0's state.pt; resuming is exact with the same
  number of ranks.
* `train.compile: true` compiles each decoder layer (torch.compile) before it is sharded.
Gradients are reduce-scattered after every micro-batch's backward and accumulate in the shards (no full-size
gradient is ever held). QLoRA's 4-bit weights cannot be sharded here: use DDP or ZeRO-2 for it (checked by config).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from llava_sft.train.engines.base import (
    Engine,
    compile_decoder_layers,
    decoder_layers,
    params_to_buffers,
)

log = logging.getLogger(__name__)

TAG = "fsdp2"  # sub-directory of a periodic checkpoint holding the sharded files


class FSDP2Engine(Engine):
    name = checkpoint_name = "fsdp2"
    keeps_fp32_masters = True  # parameters are upcast to fp32 before sharding (see the module docstring)
    equal_forward_passes = True  # each layer's forward all-gathers its weights: every rank runs as many

    def __init__(self, cfg, world: int, rank: int):
        super().__init__(cfg.train, world, rank)
        self.mesh = None
        self.load_dtypes: dict[str, torch.dtype] = {}

    def init_distributed(self, cuda: bool) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        self.name_the_device_for_deepspeed(cuda)
        self.lone_process_environment()
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if cuda else "gloo")
        kind, shard = "cuda" if cuda else "cpu", self.train_cfg.fsdp_shard_size or self.world
        if self.world % shard:
            raise ValueError(f"train.fsdp_shard_size={shard} must divide the world size {self.world}")
        self.mesh = (init_device_mesh(kind, (self.world // shard, shard), mesh_dim_names=("replicate", "shard"))
                     if shard < self.world else init_device_mesh(kind, (self.world,)))

    def text_only_anchor(self) -> str:
        # the projector's forward all-gathers its shards: every rank must run it, a text-only batch on a blank image
        return "modules" if self.world > 1 else "none"

    def autocast(self, device: torch.device) -> bool:
        return False  # on a GPU the MixedPrecisionPolicy computes in bf16; on a CPU everything is fp32

    def setup(self, model, make_groups: Callable, lr_lambda: Callable) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        self.model = self.module = model
        model.text_only_anchor = self.text_only_anchor()
        params_to_buffers(model.vision_tower)
        for name, p in model.named_parameters():
            self.load_dtypes[name] = p.dtype
            p.data = p.data.float()  # fp32 master weights (also what FSDP2's uniform-dtype groups need)
        cuda = next(model.parameters()).device.type == "cuda"
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if cuda and self.train_cfg.bf16 else MixedPrecisionPolicy()
        if self.train_cfg.compile:
            compile_decoder_layers(model.llm)
        layers = decoder_layers(model.llm)
        for layer in layers:
            fully_shard(layer, mesh=self.mesh, mp_policy=mp)
        fully_shard(model.projector, mesh=self.mesh, mp_policy=mp)  # its own group: its inputs (the tower's
        fully_shard(model, mesh=self.mesh, mp_policy=mp)  # features) are cast to the compute dtype; the rest: embeddings,
        # final norm, LM head
        if not cuda:  # gloo's reduce-scatter sums where FSDP2 asks it to average (ReduceOp.AVG; found here: the
            # gradient norm was exactly world x the one-process norm), so sum and divide after, as fp16 does
            for module in (*layers, model.projector, model):
                module.set_force_sum_reduction_for_comms(True)
        self.optimizer = self.adamw(make_groups(model))  # over the sharded parameters (new Parameter objects)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda)
        log.info("FSDP2: %d decoder layers + the rest sharded over %s%s, fp32 master weights, compute in %s%s",
                 len(layers), dict(zip(self.mesh.mesh_dim_names or ("shard",), self.mesh.shape, strict=True)),
                 " (HSDP)" if self.mesh.ndim == 2 else "", "bf16" if mp.param_dtype else "fp32",
                 ", decoder layers compiled" if self.train_cfg.compile else "")

    def prepare_frozen(self, module):
        """Sharded as the trained model is (decoder layers, projector, the rest), in the same compute dtype; its
        weights stay in their load dtype (nothing steps them)."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        params_to_buffers(module.vision_tower)
        module.text_only_anchor = self.text_only_anchor()
        cuda = next(module.parameters()).device.type == "cuda"
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16) if cuda and self.train_cfg.bf16 else MixedPrecisionPolicy()
        for layer in decoder_layers(module.llm):
            fully_shard(layer, mesh=self.mesh, mp_policy=mp)
        fully_shard(module.projector, mesh=self.mesh, mp_policy=mp)
        fully_shard(module, mesh=self.mesh, mp_policy=mp)
        return module

    # ------------------------------------------------------------ checkpoints
    def _options(self, **kw):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(**kw)

    def checkpoint_state(self, model) -> dict:
        return {"engine": self.checkpoint_name, "scheduler": self.scheduler.state_dict(), "world_size": self.world,
                "trainable_names": [n for n, p in model.named_parameters() if p.requires_grad]}

    def write_checkpoint(self, directory: Path) -> None:
        """Collective: every rank writes its shards of the trainable weights and of AdamW's states."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        weights, optim = get_state_dict(self.model, self.optimizer, options=self._options(ignore_frozen_params=True))
        dcp.save({"model": self._trainable(weights), "optimizer": optim}, checkpoint_id=str(Path(directory) / TAG))

    def _trainable(self, weights: dict) -> dict:
        """The trainable weights only: the state dict also holds buffers (the whole vision tower, kept as buffers)."""
        names = {n for n, p in self.model.named_parameters() if p.requires_grad}
        return {k: v for k, v in weights.items() if k in names}

    def restore(self, state: dict, directory: Path, model) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            get_state_dict,
            set_state_dict,
        )

        self.check_resumable(state, directory, model)
        if state.get("world_size", self.world) != self.world:
            raise ValueError(f"cannot resume from {directory}: written by {state['world_size']} ranks, now {self.world}")
        options = self._options(ignore_frozen_params=True)
        weights, optim = get_state_dict(model, self.optimizer, options=options)
        loaded = {"model": self._trainable(weights), "optimizer": optim}
        dcp.load(loaded, checkpoint_id=str(Path(directory) / TAG))
        # strict=False: the file holds the trainable weights only (the frozen ones come from the model directory)
        set_state_dict(model, self.optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"],
                       options=self._options(ignore_frozen_params=True, strict=False))

        self.scheduler.load_state_dict(state["scheduler"])

    def full_state_dict(self, model, rank: int) -> dict | None:
        """Collective: the whole model on rank 0's CPU, each parameter in the dtype it was loaded in."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        full = get_model_state_dict(model, options=self._options(full_state_dict=True, cpu_offload=True))
        if rank != 0:
            return None
        return {k: v.to(self.load_dtypes[k]) if k in self.load_dtypes else v for k, v in full.items()}
