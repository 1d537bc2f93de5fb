"""dpo.reference=precomputed: the reference model's log-probs, computed once by the starting model and stored.

Before the first step of a DPO run (model/dpo.py), every pair of the data goes once through the model the run
starts from -- the same engine (ZeRO-3 / FSDP2 shards it as in training), dtype, attention kernel, packing and
micro-batches as training, dropout off, no gradient -- and each side's summed log-prob over its scored tokens is
stored. Training then runs no reference model at all: the batches carry these numbers (data/preference.py).

The store is one JSON file, `{sample id: [chosen log-prob, rejected log-prob, chosen tokens, rejected tokens]}`, in
`dpo.reference_dir` (default: beside the data, `<data.path>.reference/`), named by a key that hashes the data file
(size + sha256), the image folder, the starting model's files (LLM weights, projector, tower, tokenizer: size +
sha256) and every setting the numbers depend on. A rerun, a resume, a second run with other DPO settings (beta,
loss type, learning rate) find it and skip the pass; anything that changes the numbers changes the key.

Each rank computes a strided share (equal sizes: the last ones repeat, so every rank runs as many forward passes,
as ZeRO-3 needs) and writes its part; rank 0 merges them. On several nodes the directory must be on a file system
every node sees, as the data is.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path

import torch

from llava_sft.config import RunConfig, to_dict
from llava_sft.data.catalog import file_sha256
from llava_sft.train.collectives import agree, barrier, gather_objects
from llava_sft.train.guards import Preempted
from llava_sft.train.state import data_fingerprint

log = logging.getLogger("llava_sft.train")
FORMAT = 1
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".model", ".txt", ".jinja")


def store_dir(cfg: RunConfig) -> Path:
    return Path(cfg.dpo.reference_dir) if cfg.dpo.reference_dir else Path(f"{cfg.data.path}.reference")


def files_fingerprint(path: str | None) -> list:
    """(name, size, sha256) of a model file, or of every weight / tokenizer / config file of a directory."""
    if not path or not Path(path).exists():
        return [path]  # a hub id or an open_clip tag: named, not hashed
    p = Path(path)
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in WEIGHT_SUFFIXES) if p.is_dir() else [p]
    return [(str(f.relative_to(p)) if p.is_dir() else f.name, f.stat().st_size, file_sha256(f)[:16]) for f in files]


def store_key(cfg: RunConfig) -> str:
    """What the stored numbers depend on (module docstring), hashed."""
    model = to_dict(cfg.model)
    model.pop("lora", None)  # adapters start as the identity (LoRA's B = 0): the starting model is the base
    parts = [FORMAT, data_fingerprint(cfg), str(Path(cfg.data.image_folder).resolve()),
             files_fingerprint(cfg.model.llm.path), files_fingerprint(cfg.model.tokenizer),
             files_fingerprint(cfg.train.pretrained_projector), files_fingerprint(cfg.model.vision.pretrained),
             files_fingerprint(cfg.model.vision.model_config_file), model,
             {k: getattr(cfg.data, k) for k in ("template", "max_length", "overlong", "packing", "pack_max_tokens",
                                               "control_strings")},
             {k: getattr(cfg.train, k) for k in ("micro_batch_size", "global_batch_size", "bf16", "engine",
                                                "deepspeed", "device")}]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:24]


def prepare(cfg: RunConfig, engine, model, dataset, collate, device, use_autocast: bool, preemption) -> Path | None:
    """The run's reference, before step 1. `copy`: the frozen starting model kept beside the policy (train/build.py)
    distributed by the engine (ZeRO-3, FSDP2: sharded). `precomputed`: the stored log-probs attached to `dataset`,
    computed first when no store has them -- called before a resume loads a checkpoint, so the model is still the
    starting model (a resumed run whose store was deleted computes the same numbers again)."""
    if cfg.dpo.reference == "copy":
        model.keep_reference_copy(engine.prepare_frozen(model.reference_model))
        return None
    if cfg.dpo.reference != "precomputed":
        return None
    from llava_sft.train.trainer import batch_extras

    rank, world = engine.rank, engine.world
    key = gather_objects(store_key(cfg) if rank == 0 else None, world)[0]  # the hashing reads the model once
    path = store_dir(cfg) / f"{key}.json"
    if not path.is_file():
        _compute(cfg, engine, model, dataset, collate, device, use_autocast, batch_extras, path, preemption)
    elif rank == 0:
        log.info("dpo: reference log-probs from %s (computed before for this data, model and settings)", path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} was written by rank 0 but this rank does not see it: on several nodes "
                                f"dpo.reference_dir must be on a file system every node shares")
    dataset.attach_reference({k: (v[0], v[1]) for k, v in json.loads(path.read_text()).items()})
    return path


@torch.no_grad()
def _compute(cfg, engine, model, dataset, collate, device, use_autocast, batch_extras, path: Path, preemption):
    rank, world = engine.rank, engine.world
    n = len(dataset)
    share = list(range(rank, n, world))
    share += [share[0] if share else 0] * (math.ceil(n / world) - len(share))  # repeats: stored once
    chunk = cfg.train.global_batch_size // world if cfg.data.packing else cfg.train.micro_batch_size
    log.info("dpo: computing the reference log-probs of %d pairs with the starting model (%d per rank, chunks of "
             "%d) -> %s", n, len(share), chunk, path)
    t0, rows = time.time(), {}
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(share), chunk):
            if agree([preemption.requested], world)[0]:
                raise Preempted(0, preemption.signal_name, "none (the reference pass is computed again on restart)")
            out = collate([dataset[i] for i in share[start:start + chunk]])
            for batch in engine.align(out if isinstance(out, list) else [out]):
                if "pairs" not in batch:
                    batch = {**batch, "pairs": 0}  # a no-op batch: runs the same modules, stores nothing
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_autocast):
                    logps, counts = engine.module(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                                  batch["images"].to(device), batch["labels"].to(device),
                                                  return_logps=True, **batch_extras(batch, device))
                logps, counts = logps.double().cpu().tolist(), counts.cpu().tolist()
                for k, sample_id in enumerate(batch["ids"][:batch["pairs"]]):
                    rows[str(sample_id)] = [logps[2 * k], logps[2 * k + 1], counts[2 * k], counts[2 * k + 1]]
    finally:
        model.train(was_training)
    parts = path.parent / f"{path.stem}.parts"
    parts.mkdir(parents=True, exist_ok=True)
    _write(parts / f"rank{rank}.json", rows)
    barrier(world)
    if rank == 0:
        merged = {}
        for r in range(world):
            merged.update(json.loads((parts / f"rank{r}.json").read_text()))
        _write(path, merged)
        for r in range(world):
            (parts / f"rank{r}.json").unlink()
        parts.rmdir()
        log.info("dpo: reference log-probs of %d pairs in %.1f s -> %s", len(merged), time.time() - t0, path)
    barrier(world)


def _write(path: Path, rows: dict) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(rows))
    os.replace(tmp, path)
