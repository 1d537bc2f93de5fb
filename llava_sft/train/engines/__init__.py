"""Distributed engines behind one protocol (engines/base.py): `train.engine: ddp | deepspeed | fsdp2`.

    ddp        one process, or DistributedDataParallel: every rank holds everything (engines/ddp.py)
    deepspeed  ZeRO-2/3 from the JSON in train.deepspeed (engines/deepspeed.py)
    fsdp2      torch's fully_shard per decoder layer, HSDP, sharded checkpoints (engines/fsdp2.py)

`auto` (the default) is deepspeed when train.deepspeed names a JSON, else ddp.
"""
from __future__ import annotations

from llava_sft.train.engines.base import Engine, no_op_batch

__all__ = ["Engine", "engine_name", "make_engine", "no_op_batch"]


def engine_name(train_cfg) -> str:
    if train_cfg.engine == "auto":
        return "deepspeed" if train_cfg.deepspeed else "ddp"
    return train_cfg.engine


def make_engine(cfg, world: int, rank: int) -> Engine:
    name = engine_name(cfg.train)
    if name == "deepspeed":
        from llava_sft.train.engines.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(cfg, world, rank)
    if name == "fsdp2":
        from llava_sft.train.engines.fsdp2 import FSDP2Engine

        return FSDP2Engine(cfg, world, rank)
    from llava_sft.train.engines.ddp import DDPEngine

    return DDPEngine(cfg.train, world, rank)
