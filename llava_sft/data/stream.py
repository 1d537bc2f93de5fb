"""Optimizer steps over a shard stream (`data.shards`): the batch plan of a `ShardDataset`.

The shards are split over ranks and DataLoader workers by `ShardDataset` (every sample of an epoch on
exactly one rank and worker, order a function of seed, epoch, world size and num_workers; shuffled by
shard order and a per-worker buffer of `data.shuffle_buffer` samples). Each rank takes
`global_batch_size / world_size` samples of its stream per step, in stream order, as micro-batches of
`micro_batch_size` samples (or packed, data/packing.py). An epoch has ceil(samples of the largest rank /
samples per rank and step) steps; its last step gets what is left (a smaller global batch, normalised by
its own supervised-token count as always): every sample is seen exactly once per epoch, none repeated.

The data position of a checkpoint is (epoch, step in epoch); resuming streams the epoch again and passes
over the samples of the steps already taken without decoding them (`ShardDataset.set_epoch(epoch, skip)`),
so it continues with exactly the samples an uninterrupted run would have had, provided the world size and
`data.num_workers` are those of the checkpoint (the trainer checks both).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from itertools import islice

import torch
from torch.utils.data import DataLoader

from llava_sft.data.shards import ShardDataset
from llava_sft.preemption import ignore_in_worker


class StreamPlan:
    def __init__(self, dataset: ShardDataset, global_batch_size: int, micro_batch_size: int, world_size: int,
                 packing: bool = False):
        if global_batch_size % world_size:
            raise ValueError(f"train.global_batch_size ({global_batch_size}) must be a multiple of the world size "
                             f"({world_size})")
        self.dataset, self.packing = dataset, packing
        self.samples_per_step = global_batch_size // world_size  # per rank
        if not packing and self.samples_per_step % micro_batch_size:
            raise ValueError(f"train.global_batch_size ({global_batch_size}) must be a multiple of world_size x "
                             f"micro_batch_size ({world_size} x {micro_batch_size})")
        self.micro_batch_size = self.samples_per_step if packing else micro_batch_size
        self.accumulation_steps = self.samples_per_step // self.micro_batch_size
        self.steps_per_epoch = -(-max(dataset.rank_counts()) // self.samples_per_step)

    def repeated_per_epoch(self) -> int:
        return self.dataset.repeated_per_epoch()

    def epoch_steps(self, epoch: int, start: int, collate: Callable, num_workers: int,
                    dataset=None) -> Iterator[list[dict]]:
        """This rank's micro-batches of each step of `epoch`, from step `start` on (the plan holds its stream;
        `dataset` is there for the signature BatchPlan shares)."""
        self.dataset.set_epoch(epoch, skip=start * self.samples_per_step)
        loader = DataLoader(self.dataset, batch_size=None, num_workers=num_workers, worker_init_fn=ignore_in_worker,
                            pin_memory=torch.cuda.is_available())
        samples = iter(loader)
        for _ in range(start, self.steps_per_epoch):
            share = list(islice(samples, self.samples_per_step))
            if self.packing:
                yield collate(share)
            else:
                size = self.micro_batch_size
                yield [collate(share[i:i + size]) for i in range(0, len(share), size)] or [collate([])]
