"""Deterministic batch plan: which samples form each optimizer step, on each rank.

An epoch is a list of global batches (`global_batch_size` samples each, over all ranks). A global
batch is split into `world_size` contiguous rank shares, and each share into micro-batches
(gradient accumulation). The plan depends only on (seed, epoch), so a run can resume at any step.

`group_by_modality=True` follows LLaVA-1.5's `group_by_modality_length`: a global batch holds only
image samples or only text-only samples, sorted by length inside the batch so micro-batches pad
little; the leftovers of both modalities form one final mixed batch.

`group_by_length=True` follows the HF Trainer's `group_by_length` (LengthGroupedSampler): the shuffled order is cut
into megabatches of LENGTH_MEGABATCH global batches, each megabatch sorted by length and cut into global batches, so
a batch holds samples of similar length and pads little; the full batches are then shuffled (HF keeps them longest
first inside each megabatch, a within-epoch length curriculum we do not want). With `group_by_modality` the
grouping is done inside each modality. On the demo's Stage 2 (2-5 question turns per sample, batch 16) it cut the
padded share of the tokens from 31 % to 6 %, but lowered accuracy at all three seeds (batches of one length are
batches of one number of turns there; benchmarks/RESULTS.md, twelfth session): off by default, measure first.

`strided_shares=True` (used with packing) gives rank r the samples r, r + world_size, ... of a
global batch instead of a contiguous share: with length-sorted (modality-grouped) batches every
rank then gets long and short samples alike, so packed ranks do similar work per step.

The last global batch of an epoch is filled up to full size with samples from the start of the
epoch's order (as DistributedSampler pads), so every step has the same global batch size; the
number of repeated samples is reported.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader

from llava_sft.preemption import ignore_in_worker

LENGTH_MEGABATCH = 50  # global batches per length-sorted megabatch (HF LengthGroupedSampler's mega_batch_mult)


class BatchPlan:
    def __init__(self, lengths: list[int], has_image: list[bool], global_batch_size: int, micro_batch_size: int,
                 world_size: int = 1, rank: int = 0, seed: int = 0, group_by_modality: bool = False,
                 strided_shares: bool = False, group_by_length: bool = False):
        if global_batch_size % (world_size * micro_batch_size):
            raise ValueError(
                f"train.global_batch_size ({global_batch_size}) must be a multiple of "
                f"world_size x micro_batch_size ({world_size} x {micro_batch_size})"
            )
        if not lengths:
            raise ValueError("the dataset is empty")
        self.lengths, self.has_image = lengths, has_image
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.world_size, self.rank, self.seed = world_size, rank, seed
        self.group_by_modality, self.strided_shares = group_by_modality, strided_shares
        self.group_by_length = group_by_length
        self.accumulation_steps = global_batch_size // (world_size * micro_batch_size)

    @property
    def steps_per_epoch(self) -> int:
        return -(-len(self.lengths) // self.global_batch_size)

    def repeated_per_epoch(self) -> int:
        return self.steps_per_epoch * self.global_batch_size - len(self.lengths)

    def global_batches(self, epoch: int) -> list[list[int]]:
        gen = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
        order = torch.randperm(len(self.lengths), generator=gen).tolist()
        size = self.global_batch_size
        if not self.group_by_modality:
            full = len(order) - len(order) % size
            batches = self._cut(order[:full], size)
            if self.group_by_length:
                batches = [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]
            batches += [order[full:]] if full < len(order) else []
        else:
            batches, leftovers = [], []
            for modality in (True, False):
                idx = [i for i in order if self.has_image[i] == modality]
                full = len(idx) - len(idx) % size
                batches += self._cut(idx[:full], size)
                leftovers += idx[full:]
            shuffle = torch.randperm(len(batches), generator=gen).tolist()
            batches = [batches[i] for i in shuffle] + [leftovers[i:i + size] for i in range(0, len(leftovers), size)]
            batches = [sorted(b, key=lambda i: -self.lengths[i]) for b in batches]
        if len(batches[-1]) < size:  # fill the last batch from the start of the epoch's order
            fill = (order * (size // len(order) + 1))[: size - len(batches[-1])]
            batches[-1] = batches[-1] + fill
        assert len(batches) == self.steps_per_epoch and all(len(b) == size for b in batches)
        return batches

    def _cut(self, idx: list[int], size: int) -> list[list[int]]:
        """`idx` (a whole number of batches) cut into batches: in order, or by length inside each megabatch."""
        if self.group_by_length:
            mega = size * LENGTH_MEGABATCH
            idx = [i for start in range(0, len(idx), mega)
                   for i in sorted(idx[start:start + mega], key=lambda i: -self.lengths[i])]
        return [idx[i:i + size] for i in range(0, len(idx), size)]

    def micro_batches(self, global_batch: list[int]) -> list[list[int]]:
        """This rank's micro-batches of one global batch."""
        share = self.global_batch_size // self.world_size
        if self.strided_shares:
            share_of_rank = global_batch[self.rank::self.world_size]
        else:
            share_of_rank = global_batch[self.rank * share:(self.rank + 1) * share]
        return [share_of_rank[i:i + self.micro_batch_size] for i in range(0, share, self.micro_batch_size)]

    def epoch_steps(self, epoch: int, start: int, collate: Callable, num_workers: int,
                    dataset) -> Iterator[list[dict]]:
        """This rank's micro-batches of each step of `epoch`, from step `start` on, loaded by `num_workers`."""
        micro = [mb for gb in self.global_batches(epoch)[start:] for mb in self.micro_batches(gb)]
        loader = iter(DataLoader(dataset, batch_sampler=micro, collate_fn=collate, num_workers=num_workers,
                                 worker_init_fn=ignore_in_worker, persistent_workers=False, pin_memory=torch.cuda.is_available()))
        if self.strided_shares:  # packing: one loader item is a rank's share, already packed into micro-batches
            yield from loader
            return
        while True:
            step = list(itertools.islice(loader, self.accumulation_steps))
            if not step:
                return
            yield step
