"""Plain PyTorch: one process, or DistributedDataParallel over torchrun's ranks (`train.engine: ddp`, the default
when no DeepSpeed JSON is named). Every rank holds the whole model, its gradients and AdamW's states; the gradients
live in DDP's all-reduce buckets (gradient_as_bucket_view: no second copy). A periodic checkpoint holds the
trainable weights, the optimizer and the schedule in rank 0's state.pt."""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import torch
import torch.distributed as dist

from llava_sft.train.engines.base import Engine, compile_decoder_layers

log = logging.getLogger(__name__)


class DDPEngine(Engine):
    name = "ddp"
    checkpoint_name = "torch"  # what checkpoints of plain runs have always recorded

    @classmethod
    def local(cls, model, optimizer=None, scheduler=None, train_cfg=None) -> DDPEngine:
        """One process around a model (and optimizer) built elsewhere: tests and benchmarks step it directly."""
        engine = cls(train_cfg, 1, 0)
        engine.model = engine.module = model
        engine.optimizer, engine.scheduler = optimizer, scheduler
        model.text_only_anchor = "none"
        return engine

    def init_distributed(self, cuda: bool) -> None:
        self.name_the_device_for_deepspeed(cuda)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if cuda else "gloo")

    def setup(self, model, make_groups: Callable, lr_lambda: Callable) -> None:
        self.model = model
        model.text_only_anchor = self.text_only_anchor()
        if self.train_cfg.compile:
            log.info("compiled %d decoder layers (train.compile)", compile_decoder_layers(model.llm))
        self.optimizer = self.adamw(make_groups(model))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda)
        self.module = torch.nn.parallel.DistributedDataParallel(
            model, find_unused_parameters=False, gradient_as_bucket_view=True) if self.world > 1 else model

    def accumulating(self, last: bool):
        """Gradients are all-reduced in the last micro-batch's backward only."""
        return contextlib.nullcontext() if last or self.world == 1 else self.module.no_sync()

    def checkpoint_state(self, model) -> dict:
        return {"engine": self.checkpoint_name,
                "trainable": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def restore(self, state: dict, directory, model) -> None:
        self.check_resumable(state, directory, model)
        named = dict(model.named_parameters())
        for name, tensor in state["trainable"].items():
            named[name].data.copy_(tensor)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
