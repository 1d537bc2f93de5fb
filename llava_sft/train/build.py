"""Everything a run builds before its first step: the device, the model, tokenizer and dataset, the batch plan and
the collator, the log. (train/trainer.py then runs the steps.)"""
from __future__ import annotations

import logging
import os
import random
from pathlib import Path

import numpy as np
import torch

from llava_sft.config import RunConfig
from llava_sft.data.dataset import Collator, LlavaJsonDataset
from llava_sft.data.images import ImageProcessor
from llava_sft.data.packing import PackingCollator
from llava_sft.data.sampler import BatchPlan
from llava_sft.data.shards import ShardDataset
from llava_sft.data.stream import StreamPlan
from llava_sft.data.templates import get_template
from llava_sft.model.llava import LlavaModel, load_tokenizer

log = logging.getLogger("llava_sft.train")


def device_and_ranks(device_pref: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device) from the torchrun environment and train.device; the engine then starts the
    process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is available")
    if torch.cuda.is_available() and device_pref in ("auto", "cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def enable_gradient_checkpointing(llm: torch.nn.Module, reentrant: bool) -> None:
    """Non-reentrant checkpointing, except under ZeRO-3: there, recomputing a LoRA layer's frozen, partitioned base
    weight gives an empty tensor ("Recomputed values ... have different metadata", found by preflight on the LoRA
    recipe), so ZeRO-3 uses the reentrant variant, as LLaVA's runs did (HF Trainer's default then). Reentrant
    checkpointing passes gradients only through inputs that require them: the input embeddings are made to (a
    text-only batch under LoRA has no trainable tensor before the first layer otherwise)."""
    llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:
        llm.enable_input_require_grads()


def log_trainable(report: dict[str, tuple[int, int]]) -> None:
    log.info("%-14s %16s %16s  %s", "module", "trainable", "total", "status")
    for name, (trainable, total) in report.items():
        status = "frozen" if trainable == 0 else ("trainable" if trainable == total else "partly trainable")
        log.info("%-14s %16s %16s  %s", name, f"{trainable:,}", f"{total:,}", status)


def build(cfg: RunConfig, device: torch.device, rank: int = 0, world: int = 1):
    """Model, tokenizer, dataset for a run config (also used by tests); with data.shards the dataset is this
    rank's stream."""
    check_data_source(cfg)
    tok_path = cfg.model.tokenizer or cfg.model.llm.path
    if not tok_path:
        raise ValueError("model.tokenizer is required when the LLM is built from a config")
    tokenizer = load_tokenizer(tok_path, use_fast=cfg.model.tokenizer_use_fast)
    template = get_template(cfg.data.template, cfg.model.system_prompt, cfg.data.loss_on, tokenizer)  # unknown: now
    if cfg.model.llm.config is not None:
        cfg.model.llm.config.setdefault("vocab_size", len(tokenizer))
    model = LlavaModel(cfg.model)
    if cfg.model.lora is not None:
        model.add_lora(cfg.train.gradient_checkpointing)
    if cfg.dpo is not None:  # Stage 3 (model/dpo.py): the loss, dropout off (LoRA's too)
        from llava_sft.model.dpo import PreferenceLoss, disable_dropout

        model.preference = PreferenceLoss.of(cfg.dpo)
        if disable_dropout(model):
            log.info("dpo: dropout set to 0 (the policy's log-probs must be computed as the reference's are)")
    vocab = model.llm_vocab_size
    if vocab < len(tokenizer):
        raise ValueError(f"the LLM has {vocab} token embeddings but the tokenizer has {len(tokenizer)} tokens")
    if cfg.train.pretrained_projector:
        model.load_projector(cfg.train.pretrained_projector)
    tower = model.vision_tower
    processor = ImageProcessor(tower.image_size, tower.image_mean, tower.image_std, cfg.model.image_aspect, model.anyres)
    args = (tokenizer, template, processor, model.tokens_per_image, sample_max_length(cfg), cfg.data.overlong,
            cfg.data.bad_samples)
    if cfg.dpo is not None:
        from llava_sft.data.preference import PreferenceDataset

        dataset = PreferenceDataset(cfg.data.path, cfg.data.image_folder, *args, cfg.data.check_images_at_start,
                                    control_strings=cfg.data.control_strings, cache_dir=cfg.data.cache_dir or None,
                                    startup_cache=cfg.data.startup_cache, cache_samples=cfg.data.cache_samples)
    elif cfg.data.shards:
        dataset = ShardDataset(cfg.data.shards, *args, shuffle_buffer=cfg.data.shuffle_buffer, seed=cfg.train.seed,
                               verify=cfg.data.verify_shards, control_strings=cfg.data.control_strings,
                               rank=rank, world_size=world)
    else:
        dataset = LlavaJsonDataset(cfg.data.path, cfg.data.image_folder, *args, cfg.data.check_images_at_start,
                                   control_strings=cfg.data.control_strings, cache_dir=cfg.data.cache_dir or None,
                                   startup_cache=cfg.data.startup_cache, cache_samples=cfg.data.cache_samples)
    model = model.to_device(device)
    if cfg.dpo is not None and cfg.dpo.reference == "copy":  # the starting model, frozen, beside the policy
        model.keep_reference_copy(starting_model_copy(cfg, model, device))
    return model, tokenizer, dataset


def starting_model_copy(cfg: RunConfig, model: LlavaModel, device) -> LlavaModel | None:
    """dpo.reference=copy: the starting model once more, loaded as the policy was (under ZeRO-3 its LLM loads
    partitioned, so that the engine can shard it: train/reference.py), without adapters (LoRA's start as the
    identity); its projector, tower and image_newline copied from the policy. An LLM built from a config (random
    weights) is deep-copied instead (None)."""
    if not cfg.model.llm.path or cfg.model.lora is not None and cfg.model.lora.quantize:
        return None
    import dataclasses

    reference = LlavaModel(dataclasses.replace(cfg.model, lora=None))
    reference.projector.load_state_dict(model.projector.state_dict())
    reference.vision_tower.load_state_dict(model.vision_tower.state_dict())
    if model.anyres is not None:
        with torch.no_grad():
            reference.image_newline.copy_(model.image_newline)
    return reference.to_device(device)


def pack_budget(cfg: RunConfig) -> int | None:
    """Tokens per packed row (None without packing)."""
    if not cfg.data.packing:
        return None
    # a preference pair is packed whole (data/packing.py): by default a row holds two sides of max_length
    budget = cfg.data.pack_max_tokens or cfg.data.max_length * (2 if cfg.dpo is not None else 1)
    if budget < 1:
        raise ValueError(f"data.pack_max_tokens must be positive, got {budget}")
    return budget


def sample_max_length(cfg: RunConfig) -> int:
    """The over-long policy's limit: a packed row holds at least one whole sample."""
    budget = pack_budget(cfg)
    if budget is not None and cfg.dpo is not None:  # both sides of a pair in one row
        budget //= 2
    return cfg.data.max_length if budget is None else min(cfg.data.max_length, budget)


def make_collator(cfg: RunConfig, tokenizer, tokens_per_image: int):
    budget = pack_budget(cfg)
    split = None
    if cfg.dpo is not None:  # a preference pair is a unit of two rows / segments (data/preference.py)
        from llava_sft.data.preference import pair_sides as split
    if budget is None:
        return Collator(tokenizer.pad_token_id, split)
    return PackingCollator(tokenizer.pad_token_id, tokens_per_image, budget, cfg.train.micro_batch_size, split)


def check_data_source(cfg: RunConfig) -> None:
    if bool(cfg.data.path) == bool(cfg.data.shards):
        raise ValueError("set exactly one of data.path (a LLaVA JSON) and data.shards (a shard directory); to train "
                         "from shards with a config that names a JSON, add data.path=''")
    for key in ("group_by_modality", "group_by_length"):
        if cfg.data.shards and getattr(cfg.data, key):
            raise ValueError(f"data.{key} needs data.path: a stream from data.shards is not grouped")


def make_plan(cfg: RunConfig, dataset, world: int, rank: int) -> BatchPlan | StreamPlan:
    """The batch plan; with packing, a rank's share of a global batch is one unit (packed by the collator),
    strided over the batch so that the ranks get similar lengths. From shards: the stream's plan."""
    train = cfg.train
    if cfg.data.shards:
        return StreamPlan(dataset, train.global_batch_size, train.micro_batch_size, world, cfg.data.packing)
    micro = train.global_batch_size // world if cfg.data.packing else train.micro_batch_size
    if cfg.data.packing and train.global_batch_size % world:
        raise ValueError(f"train.global_batch_size ({train.global_batch_size}) must be a multiple of the world "
                         f"size ({world})")
    return BatchPlan([dataset.approx_length(i) for i in range(len(dataset))],
                     [dataset.has_image(i) for i in range(len(dataset))], train.global_batch_size,
                     micro, world, rank, train.seed, cfg.data.group_by_modality, strided_shares=cfg.data.packing,
                     group_by_length=cfg.data.group_by_length)


def warn_about_repeats(repeated: int, samples: int, global_batch: int) -> None:
    """The last global batch of an epoch is filled with repeated samples; say so when that is not negligible."""
    if samples < global_batch or repeated > 0.01 * samples:
        log.warning("each epoch repeats %d samples (%.1f %% of the %d) to fill its last global batch of %d%s: lower "
                    "train.global_batch_size or add data if that matters", repeated, 100 * repeated / max(1, samples),
                    samples, global_batch, "; the dataset is smaller than ONE global batch" if samples < global_batch
                    else "")


def setup_logging(run_dir: Path | None, verbose: bool | None = None) -> None:
    """Global rank 0 writes RUN_DIR/train.log; the first rank of every node (LOCAL_RANK 0, `verbose`) logs its
    progress to its node's stderr (its start-up check, its loader); the other ranks only warnings."""
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if run_dir is not None:
        handlers.append(logging.FileHandler(run_dir / "train.log"))
    verbose = run_dir is not None if verbose is None else verbose or run_dir is not None
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=handlers, force=True)
