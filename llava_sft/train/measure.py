"""Numbers the training log reports that need every rank: sums, peak memory, live tensor bytes."""
from __future__ import annotations

import gc
import itertools

import torch

from llava_sft.train.collectives import max_over_ranks


def peak_memory_gb(device: torch.device, world: int) -> float:
    """Peak memory so far, max over ranks (collective): CUDA max_memory_allocated, or the process's peak RSS on
    a CPU (which also counts the Python/torch runtime)."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
    return round(max_over_ranks([peak], world)[0], 3)


def live_tensor_gb(model, device: torch.device, world: int) -> float:
    """GiB held by all live tensors of this process (each storage counted once), max over ranks (collective).
    `.grad` tensors made by autograd have no Python object until read, so the model's are added explicitly."""
    seen, total = set(), 0
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    for obj in itertools.chain(gc.get_objects(), grads):
        if isinstance(obj, torch.Tensor):
            try:
                storage = obj.untyped_storage()
                pointer = storage.data_ptr()
            except (RuntimeError, NotImplementedError):  # tensors without storage, or torch.compile's fake tensors
                continue  # (left in its caches after a compiled run in the same process)
            if pointer not in seen:
                seen.add(pointer)
                total += storage.nbytes()
    return round(max_over_ranks([total / 2**30], world)[0], 4)
