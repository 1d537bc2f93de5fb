"""Every collective of ours (scalars, flags, counts, small Python objects) in one place, on the device the process
group serves.

NCCL takes CUDA tensors only: torch registers it for the "cuda" device type alone
(`dist.Backend.backend_capability["nccl"] == ["cuda"]`), and an all-reduce of a CPU tensor raises "No backend type
associated with device type cpu". gloo takes both, so CPU tests never saw the step statistics and `align`'s count
built on the CPU: every multi-GPU run stopped at its first step (issue 38). So nothing here trusts the training
device or a default: the tensor goes where the group says (`comm_device`), and the result comes back as Python
values. A group that serves only a device this process does not have is a clear error, not a crash in c10d.

A CPU run reproduces NCCL's device map with `dist.init_process_group(backend="cuda:gloo")`
(tests/test_collectives.py); only a machine with two GPUs shows a real NCCL run (benchmarks/gpu_check.sh).
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.distributed as dist


class CollectiveDeviceError(RuntimeError):
    """The process group serves no device type this process can put a tensor on."""


def served_device_types(group=None) -> list[str]:
    """The device types the group's backend takes tensors of: ["cuda"] under NCCL, ["cpu", "cuda"] under gloo."""
    group = group or dist.group.WORLD
    types = getattr(group, "_device_types", None)  # the group's own map (a "cuda:gloo" group says ["cuda"])
    if types:
        return [torch.device(t).type for t in types]
    backend = str(dist.get_backend(group))
    return list(dist.Backend.backend_capability.get(backend, ["cpu"]))


def comm_device(group=None) -> torch.device:
    """Where a collective's tensor must live: the CPU when the backend takes CPU tensors (gloo), else this rank's
    accelerator (NCCL: cuda:LOCAL_RANK, the device `train/build.py` set current)."""
    types = served_device_types(group)
    if "cpu" in types:
        return torch.device("cpu")
    kind = types[0]
    module = getattr(torch, kind, None)
    if module is None or not module.is_available():
        backend = dist.get_backend(group or dist.group.WORLD)
        raise CollectiveDeviceError(
            f"the process group's backend ({backend}) takes only {kind} tensors, and this process has no {kind} "
            f"device: run on a node with {kind} devices, or let the engine choose gloo (train.device=cpu)")
    index = module.current_device() if hasattr(module, "current_device") else int(os.environ.get("LOCAL_RANK", 0))
    return torch.device(kind, index)


def _reduce(values: Sequence[float], op, world: int, dtype=torch.float64) -> list[float]:
    if world == 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=dtype, device=comm_device())
    dist.all_reduce(t, op=op)
    return t.cpu().tolist()


def sum_over_ranks(values: Sequence[float], world: int) -> list[float]:
    """Element-wise sums over ranks, in float64 (token counts of a 7B run's step stay exact far past 2**24)."""
    return _reduce(values, dist.ReduceOp.SUM, world)


def max_over_ranks(values: Sequence[float], world: int) -> list[float]:
    return _reduce(values, dist.ReduceOp.MAX, world)


def agree(flags: Sequence[bool], world: int) -> list[bool]:
    """Each flag true on any rank -> true on every rank (one tiny all-reduce): a rank that got the signal a moment
    later, or whose clock says a checkpoint is due, must not leave the others waiting in a collective."""
    return [v > 0 for v in max_over_ranks([float(bool(f)) for f in flags], world)]


def sum_tensor_over_ranks(value: torch.Tensor, world: int) -> torch.Tensor:
    """A tensor summed over ranks (e.g. a loss on the training device), returned on its own device."""
    if world == 1:
        return value
    t = value.detach().to(comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.to(value.device)


def gather_objects(obj, world: int) -> list:
    """Every rank's `obj` (picklable), in rank order. torch serialises through a tensor on the group's device
    (`_get_object_coll_device`); the device is checked here first so that a group this process cannot serve is
    our error, not the driver's."""
    if world == 1:
        return [obj]
    comm_device()
    gathered: list = [None] * world
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier(world: int) -> None:
    """A barrier on the group's device (gloo's default would put its tensor on the CPU; NCCL's on the current
    CUDA device, which train/build.py set to cuda:LOCAL_RANK)."""
    if world == 1:
        return
    device = comm_device()
    if device.type == "cuda":
        dist.barrier(device_ids=[device.index])
    else:
        dist.barrier()
