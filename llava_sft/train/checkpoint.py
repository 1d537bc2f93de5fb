"""Periodic training checkpoints: one obvious dict, written atomically, the last N kept.

    step_N/state.pt      {"step", "data_position": {"epoch", "step_in_epoch", "steps_per_epoch"},
                          "trainable": {name: tensor}, "optimizer", "scheduler", "config": {...},
                          "world_size"}
    step_N/rank{r}.pt    per rank: {"rng": {...}, "report": {"skipped": [...], "truncated": n}}
    step_N/DONE

Under DeepSpeed (train.deepspeed) `state.pt` holds {"engine": "deepspeed", "zero_stage", "trainable_names"}
instead of the weights, optimizer and scheduler, which are the engine's own checkpoint files written by every
rank into `step_N/deepspeed/` (engine.save_checkpoint / load_checkpoint) - inside the same temporary directory,
so the atomic rename, DONE and keep_last hold as they are.

`trainable` holds only parameters that train (the projector in Stage 1), so Stage-1 checkpoints
are small and resumable. Every rank saves its own RNG state and skip report. A checkpoint
directory is complete once `DONE` exists inside it; it is written under a temporary name and
renamed, so a crash while saving never leaves a checkpoint that looks valid but is not.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from llava_sft.train.collectives import barrier

STEP_DIR = re.compile(r"^step_(\d+)$")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root: str | Path, step: int, payload: dict | None, keep_last: int,
                    rank_state: dict | None = None, rank: int = 0, world: int = 1, write_collective=None) -> Path:
    """Collective under DDP: every rank calls it; rank 0 passes `payload`, each rank its `rank_state`.

    `write_collective(tmp_dir)`, if given, is called on every rank before the checkpoint is completed
    (DeepSpeed's sharded engine state)."""
    root = Path(root)
    final, tmp = root / f"step_{step}", root / f".tmp_step_{step}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        _check_free_space(root, step)
        tmp.mkdir()
    barrier(world)
    try:
        torch.save(rank_state or {}, tmp / f"rank{rank}.pt")
        if write_collective is not None:
            write_collective(tmp)
        barrier(world)
        if rank == 0:
            torch.save(payload, tmp / "state.pt")
            (tmp / "DONE").write_text(str(step))
            _fsync_tree(tmp)  # the bytes are on disk before the name says "complete" (a node crash after the
            shutil.rmtree(final, ignore_errors=True)  # rename otherwise can leave step_N/DONE beside a truncated file)
            os.replace(tmp, final)
            _fsync(root)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk must not keep a half checkpoint eating what is left
        raise OSError(e.errno, f"checkpoint {final} could not be written ({e.strerror or e}); the partial files were "
                               f"removed and the previous checkpoints are intact: free space under {root}, then "
                               f"run again (train.resume=auto)") from e
    if rank == 0:
        for old in list_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier(world)
    return final


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync(Path(folder) / name)
        _fsync(Path(folder))


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _check_free_space(root: Path, step: int) -> None:
    """The newest checkpoint's size (+10 %) must fit, or the write would fail half-way (torch's message then was
    'unexpected pos 650304 vs 650196')."""
    found = list_checkpoints(root)
    if not found:
        return
    need, free = int(_size(found[-1]) * 1.1), shutil.disk_usage(root).free
    if free < need:
        raise OSError(28, f"checkpoint step_{step} needs ~{need / 2**30:.2f} GiB (the last one was "
                          f"{need / 1.1 / 2**30:.2f} GiB) but {root} has {free / 2**30:.2f} GiB free: free space (or "
                          f"lower train.keep_last), then run again (train.resume=auto)")


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and (p / "DONE").is_file()]
    return [p for _, p in sorted(found)]


def load_checkpoint(path: str | Path, rank: int = 0) -> tuple[dict, dict]:
    """(shared state, this rank's state) of a complete checkpoint."""
    path = Path(path)
    if not (path / "DONE").is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no DONE marker)")
    state = _load(path / "state.pt")
    rank_file = path / f"rank{rank}.pt"
    if not rank_file.is_file():
        raise FileNotFoundError(f"{path} has no state for rank {rank}: it was written by "
                                f"{state.get('world_size', '?')} rank(s); resume with the same number of ranks")
    return state, _load(rank_file)


class CorruptCheckpoint(RuntimeError):
    """A complete-looking checkpoint whose files do not load (truncated by a crash, a full disk, bad storage)."""


def _load(file: Path) -> dict:
    try:
        return torch.load(file, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CorruptCheckpoint(f"{file} does not load ({type(e).__name__}: {e})") from e
