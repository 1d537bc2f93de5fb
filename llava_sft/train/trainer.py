"""The one training core. Stage 1 and Stage 2 differ only in their config.

Stage 1 (feature alignment):   train.train_projector=true  train.train_llm=false  data.template=plain
Stage 2 (instruction tuning):  train.train_projector=true  train.train_llm=true   data.template=vicuna_v1
                               train.pretrained_projector=<stage-1 output dir>

Per optimizer step: the micro-batches of this rank are loaded first, the supervised tokens of the
whole global batch (all micro-batches, all ranks) are counted, and each micro-batch's summed
token loss is divided by that count, so accumulating k micro-batches equals one k-times-larger
batch exactly. Then: grad clipping, AdamW, warmup + cosine schedule.

With `data.packing` (data/packing.py) the same samples form each step, but a rank's share is loaded
at once and packed into rows of `data.pack_max_tokens` tokens, `train.micro_batch_size` rows per
forward pass: only the number of forward passes per step changes, not the loss.

Distributed engines: plain DDP (`train.deepspeed: null`), or DeepSpeed ZeRO-2/3 (`train.deepspeed: <json>`,
see train/engine.py), both launched with torchrun; the loss normalisation, optimizer and schedule are the same.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from llava_sft.config import RunConfig, check_paths, save_config, to_dict, validate
from llava_sft.constants import IGNORE_INDEX
from llava_sft.data.catalog import file_sha256
from llava_sft.data.dataset import Collator, LlavaJsonDataset
from llava_sft.data.images import ImageProcessor
from llava_sft.data.packing import PackingCollator, token_counts
from llava_sft.data.sampler import BatchPlan
from llava_sft.data.shards import ShardDataset
from llava_sft.data.stream import StreamPlan
from llava_sft.data.templates import get_template
from llava_sft.model.llava import LlavaModel, load_tokenizer
from llava_sft.train import checkpoint as ckpt
from llava_sft.train import engine
from llava_sft.train.flops import FlopModel, peak_flops, sequence_lengths
from llava_sft.train.guards import (
    BadSampleStop,
    NonFiniteStepError,
    Preempted,
    PreemptionNotice,
    agree,
    bad_sample_message,
    stop_if_non_finite,
)
from llava_sft.train.logger import MetricsLogger, plot_loss_curve
from llava_sft.train.probe import Probe
from llava_sft.train.rundir import RunDirLock

log = logging.getLogger("llava_sft.train")


# ----------------------------------------------------------------------------- setup
def setup_distributed(device_pref: str, deepspeed: bool = False) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_pref in ("auto", "cuda")
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is available")
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if deepspeed:
        engine.init_distributed(use_cuda)
    elif world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return rank, world, device


def peak_memory_gb(device: torch.device, world: int) -> float:
    """Peak memory so far, max over ranks (collective): CUDA max_memory_allocated, or the process's peak RSS on
    a CPU (which also counts the Python/torch runtime)."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
    return round(_max_over_ranks(peak, device, world), 3)


def _max_over_ranks(value: float, device: torch.device, world: int) -> float:
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def live_tensor_gb(model, device: torch.device, world: int) -> float:
    """GiB held by all live tensors of this process (each storage counted once), max over ranks (collective).
    `.grad` tensors made by autograd have no Python object until read, so the model's are added explicitly."""
    import gc

    seen, total = set(), 0
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    for obj in itertools.chain(gc.get_objects(), grads):
        if isinstance(obj, torch.Tensor):
            try:
                storage = obj.untyped_storage()
            except (RuntimeError, NotImplementedError):  # e.g. tensors without storage
                continue
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return round(_max_over_ranks(total / 2**30, device, world), 4)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_lambda(total_steps: int, warmup_ratio: float, schedule: str):
    """LR factor per optimizer step, exactly HF Trainer's (LLaVA's reference runs): warmup steps =
    ceil(total x warmup_ratio) (TrainingArguments.get_warmup_steps), then transformers'
    get_cosine_schedule_with_warmup / get_constant_schedule_with_warmup -- whose step 0 has LR 0: the first
    optimizer step only initialises Adam's moments (tests/test_train_mode.py compares with transformers)."""
    warmup = math.ceil(total_steps * warmup_ratio)

    def factor(step: int) -> float:  # step = number of optimizer steps already taken
        if step < warmup:
            return step / max(1, warmup)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    if schedule not in ("cosine", "constant"):
        raise ValueError(f"train.lr_schedule must be 'cosine' or 'constant', got {schedule!r}")
    return factor


def enable_gradient_checkpointing(llm: torch.nn.Module, reentrant: bool) -> None:
    """Non-reentrant checkpointing, except under ZeRO-3: there, recomputing a LoRA layer's frozen, partitioned base
    weight gives an empty tensor ("Recomputed values ... have different metadata", found by preflight on the LoRA
    recipe), so ZeRO-3 uses the reentrant variant, as LLaVA's runs did (HF Trainer's default then). Reentrant
    checkpointing passes gradients only through inputs that require them: the input embeddings are made to (a
    text-only batch under LoRA has no trainable tensor before the first layer otherwise)."""
    llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:
        llm.enable_input_require_grads()


def check_master_weights(model: torch.nn.Module, engine_keeps_masters: bool) -> None:
    """Refuse trainable 16-bit parameters that AdamW would update in place: bf16 keeps 8 significant bits, so an
    update smaller than 2^-9 of a weight (lr 2e-5 x Adam's ~unit step, against weights of ~1e-2) rounds away --
    in a 10-step check ~70 % of the weights never changed. DeepSpeed ZeRO (every stage) keeps an fp32 partition
    of each trainable parameter and steps that, so it is the one engine here that may hold 16-bit weights."""
    if engine_keeps_masters:
        return
    low = [(n, p.dtype) for n, p in model.named_parameters() if p.requires_grad and p.dtype != torch.float32]
    if low:
        dtypes = ", ".join(sorted({str(d).replace("torch.", "") for _, d in low}))
        raise ValueError(
            f"{len(low)} trainable parameter tensors are {dtypes} (e.g. {low[0][0]}) and no engine keeps fp32 master "
            f"weights: AdamW would update them in place and most updates at small learning rates round away. Fix: "
            f"train under DeepSpeed (train.deepspeed=configs/deepspeed/zero2.json or zero3.json keep fp32 masters), "
            f"or load the LLM in fp32 (model.llm.dtype=float32; train.bf16=true still computes in bf16 on a GPU)")


def param_groups(model: torch.nn.Module, weight_decay: float, lr: float, projector_lr: float | None = None) -> list[dict]:
    """Weight decay on matrices only (not on biases and norm weights), as HF Trainer / LLaVA;
    the projector may have its own learning rate (LLaVA's mm_projector_lr)."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((name.startswith("projector."), p.ndim >= 2), []).append(p)
    return [{"params": params, "weight_decay": weight_decay if decay else 0.0,
             "lr": (projector_lr or lr) if is_projector else lr}
            for (is_projector, decay), params in sorted(groups.items())]


def all_reduce_sum(value: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def log_trainable(report: dict[str, tuple[int, int]]) -> None:
    log.info("%-14s %16s %16s  %s", "module", "trainable", "total", "status")
    for name, (trainable, total) in report.items():
        status = "frozen" if trainable == 0 else ("trainable" if trainable == total else "partly trainable")
        log.info("%-14s %16s %16s  %s", name, f"{trainable:,}", f"{total:,}", status)


# ------------------------------------------------------------------------------ train
def build(cfg: RunConfig, device: torch.device, rank: int = 0, world: int = 1):
    """Model, tokenizer, dataset for a run config (also used by tests); with data.shards the dataset is this
    rank's stream."""
    check_data_source(cfg)
    tok_path = cfg.model.tokenizer or cfg.model.llm.path
    if not tok_path:
        raise ValueError("model.tokenizer is required when the LLM is built from a config")
    tokenizer = load_tokenizer(tok_path, use_fast=cfg.model.tokenizer_use_fast)
    template = get_template(cfg.data.template, cfg.model.system_prompt)  # unknown template: clear error now
    if cfg.model.llm.config is not None:
        cfg.model.llm.config.setdefault("vocab_size", len(tokenizer))
    model = LlavaModel(cfg.model)
    if cfg.model.lora is not None:
        model.add_lora(cfg.train.gradient_checkpointing)
    vocab = model.llm_vocab_size
    if vocab < len(tokenizer):
        raise ValueError(f"the LLM has {vocab} token embeddings but the tokenizer has {len(tokenizer)} tokens")
    if cfg.train.pretrained_projector:
        model.load_projector(cfg.train.pretrained_projector)
    tower = model.vision_tower
    processor = ImageProcessor(tower.image_size, tower.image_mean, tower.image_std, cfg.model.image_aspect)
    args = (tokenizer, template, processor, model.tokens_per_image, sample_max_length(cfg), cfg.data.overlong,
            cfg.data.bad_samples)
    if cfg.data.shards:
        dataset = ShardDataset(cfg.data.shards, *args, shuffle_buffer=cfg.data.shuffle_buffer, seed=cfg.train.seed,
                               verify=cfg.data.verify_shards, control_strings=cfg.data.control_strings,
                               rank=rank, world_size=world)
    else:
        dataset = LlavaJsonDataset(cfg.data.path, cfg.data.image_folder, *args, cfg.data.check_images_at_start,
                                   control_strings=cfg.data.control_strings, cache_dir=cfg.data.cache_dir or None,
                                   startup_cache=cfg.data.startup_cache)
    return model.to_device(device), tokenizer, dataset


def pack_budget(cfg: RunConfig) -> int | None:
    """Tokens per packed row (None without packing)."""
    if not cfg.data.packing:
        return None
    budget = cfg.data.pack_max_tokens or cfg.data.max_length
    if budget < 1:
        raise ValueError(f"data.pack_max_tokens must be positive, got {budget}")
    return budget


def sample_max_length(cfg: RunConfig) -> int:
    """The over-long policy's limit: a packed row holds at least one whole sample."""
    budget = pack_budget(cfg)
    return cfg.data.max_length if budget is None else min(cfg.data.max_length, budget)


def make_collator(cfg: RunConfig, tokenizer, tokens_per_image: int):
    budget = pack_budget(cfg)
    if budget is None:
        return Collator(tokenizer.pad_token_id)
    return PackingCollator(tokenizer.pad_token_id, tokens_per_image, budget, cfg.train.micro_batch_size)


def check_data_source(cfg: RunConfig) -> None:
    if bool(cfg.data.path) == bool(cfg.data.shards):
        raise ValueError("set exactly one of data.path (a LLaVA JSON) and data.shards (a shard directory); to train "
                         "from shards with a config that names a JSON, add data.path=''")
    if cfg.data.shards and cfg.data.group_by_modality:
        raise ValueError("data.group_by_modality needs data.path: a stream from data.shards is not grouped")


def make_plan(cfg: RunConfig, dataset, world: int, rank: int) -> BatchPlan | StreamPlan:
    """The batch plan; with packing, a rank's share of a global batch is one unit (packed by the collator),
    strided over the batch so that the ranks get similar lengths. From shards: the stream's plan."""
    t_cfg = cfg.train
    if isinstance(dataset, ShardDataset):
        return StreamPlan(dataset, t_cfg.global_batch_size, t_cfg.micro_batch_size, world, cfg.data.packing)
    micro = t_cfg.global_batch_size // world if cfg.data.packing else t_cfg.micro_batch_size
    if cfg.data.packing and t_cfg.global_batch_size % world:
        raise ValueError(f"train.global_batch_size ({t_cfg.global_batch_size}) must be a multiple of the world "
                         f"size ({world})")
    return BatchPlan([dataset.approx_length(i) for i in range(len(dataset))],
                     [dataset.has_image(i) for i in range(len(dataset))], t_cfg.global_batch_size,
                     micro, world, rank, t_cfg.seed, cfg.data.group_by_modality, strided_shares=cfg.data.packing)


def train(cfg: RunConfig) -> Path:
    validate(cfg)  # load_config did already; a config built in code gets the same checks before anything loads
    check_paths(cfg)  # before any weights load (a missing data file used to show after the 7B model had loaded)
    # one live run per output_dir (rank 0 holds the lock; a refusal there ends the torchrun job before any work)
    lock = RunDirLock(Path(cfg.train.output_dir)).acquire() if int(os.environ.get("RANK", "0")) == 0 else None
    try:
        with PreemptionNotice() as preemption:  # the signal handlers are the previous ones again afterwards
            return _train(cfg, preemption)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: RunConfig, preemption: "PreemptionNotice") -> Path:
    ds = None
    if cfg.train.deepspeed:  # checked before anything starts: a bad DeepSpeed JSON is a clear error now
        cuda = torch.cuda.is_available() and cfg.train.device in ("auto", "cuda")
        quantized = bool(cfg.model.lora and cfg.model.lora.quantize)
        ds = engine.DeepSpeedRun(engine.resolve_config(cfg.train.deepspeed, cfg.train,
                                                       int(os.environ.get("WORLD_SIZE", "1")), cuda, quantized))
    rank, world, device = setup_distributed(cfg.train.device, deepspeed=ds is not None)
    is_main = rank == 0
    run_dir = Path(cfg.train.output_dir)
    ckpt_root = run_dir / "checkpoints"
    if cfg.train.resume == "auto" and (run_dir / "report.json").is_file():
        _setup_logging(None)
        log.warning("%s already holds a finished run (report.json): nothing to do. Use train.resume=never to "
                    "train it again from scratch, or another train.output_dir.", run_dir)
        return run_dir
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.train.resume == "never":
            shutil.rmtree(ckpt_root, ignore_errors=True)
            (run_dir / "report.json").unlink(missing_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    if world > 1:
        dist.barrier()
    _setup_logging(run_dir if is_main else None)
    log.info("training on %s (train.device=%s), world size %d", device, cfg.train.device, world)
    seed_everything(cfg.train.seed)
    t_cfg = cfg.train

    if ds is not None:
        ds.before_model_build()  # ZeRO-3: the LLM is loaded partitioned
    model, tokenizer, dataset = build(cfg, device, rank, world)
    n_startup_skips = len(dataset.report.skipped)  # the same on every rank; runtime skips come after
    log_trainable(model.set_trainable(t_cfg.train_projector, t_cfg.train_llm))
    if t_cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model.llm, reentrant=ds is not None and ds.stage == 3)
    # from_pretrained returns the LLM in eval mode, and transformers checkpoints a decoder layer only in training
    # mode (`if self.gradient_checkpointing and self.training`): without this, gradient checkpointing was a silent
    # no-op for every LLM loaded from a directory, and dropout (LoRA's too) was off. The vision tower stays in
    # eval mode (VisionTower.train); generation and evaluation load with .eval() (LlavaModel.from_pretrained).
    model.train()
    # what a text-only micro-batch must run for this engine (LlavaModel._text_only_anchor): ZeRO-3 every module,
    # DDP and ZeRO-1/2 a gradient for every trainable parameter, one plain process nothing
    model.text_only_anchor = "modules" if ds is not None and ds.stage == 3 else ("params" if world > 1 else "none")
    plan = make_plan(cfg, dataset, world, rank)
    total_steps = t_cfg.max_steps or math.ceil(t_cfg.epochs * plan.steps_per_epoch)
    warn_about_repeats(plan.repeated_per_epoch(), dataset_size(dataset), t_cfg.global_batch_size)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("nothing to train: set train.train_projector and/or train.train_llm")
    check_master_weights(model, ds is not None)
    # FLOPs per micro-batch from its real shapes (train/flops.py), for `mfu` / `hfu` when the peak is known
    peak = peak_flops(t_cfg.flops_per_second_peak, device)
    flop_model = (FlopModel.of(model, t_cfg.gradient_checkpointing, reentrant=ds is not None and ds.stage == 3)
                  if peak else None)  # without a peak nothing is logged: no counting per step
    groups = param_groups(model, t_cfg.weight_decay, t_cfg.lr, t_cfg.projector_lr)
    schedule = lr_lambda(total_steps, t_cfg.warmup_ratio, t_cfg.lr_schedule)
    ddp = None
    if ds is not None:
        _, optimizer, scheduler = ds.initialize(model, groups, t_cfg, schedule)
    else:
        optimizer = torch.optim.AdamW(groups, lr=t_cfg.lr, betas=tuple(t_cfg.adam_betas), eps=t_cfg.adam_eps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        ddp = torch.nn.parallel.DistributedDataParallel(  # gradients live in the all-reduce buckets (no 2nd copy)
            model, find_unused_parameters=False, gradient_as_bucket_view=True) if world > 1 else None

    probe = Probe.from_env(rank)  # python -m llava_sft.preflight measures the run from inside (train/probe.py)
    if probe is not None:
        probe.on_setup(model, optimizer, ds, t_cfg.gradient_checkpointing, reentrant=ds is not None and ds.stage == 3)
    step, candidates = 0, _resume_points(t_cfg.resume, ckpt_root)
    for i, path in enumerate(candidates):  # resume=auto: newest first, falling back when one does not load
        try:
            step = _restore(path, model, optimizer, scheduler, dataset, n_startup_skips, plan, cfg, rank, ds)
            break
        except ckpt.CorruptCheckpoint as e:
            if i + 1 == len(candidates):
                raise
            log.warning("%s; falling back to the previous checkpoint, %s", e, candidates[i + 1])
    if cfg.data.packing:
        log.info("%d samples, %d steps/epoch, %d total steps; global batch %d = %d rank(s) x %d samples, packed "
                 "into rows of <= %d tokens, %d row(s) per forward pass (%s attention)", dataset_size(dataset),
                 plan.steps_per_epoch, total_steps, t_cfg.global_batch_size, world, plan.micro_batch_size,
                 pack_budget(cfg), t_cfg.micro_batch_size, model.attn_implementation)
    else:
        log.info("%d samples, %d steps/epoch, %d total steps; global batch %d = %d rank(s) x %d accumulation x %d "
                 "micro", dataset_size(dataset), plan.steps_per_epoch, total_steps, t_cfg.global_batch_size, world,
                 plan.accumulation_steps, t_cfg.micro_batch_size)
    metrics = MetricsLogger(run_dir, is_main, t_cfg.tensorboard, t_cfg.wandb_project, cfg.run_name, to_dict(cfg), resume_step=step)
    collate = make_collator(cfg, tokenizer, model.tokens_per_image)
    use_autocast = device.type == "cuda" and t_cfg.bf16 and not (ds is not None and ds.bf16)  # DS bf16: bf16 weights
    from tqdm import tqdm

    bar = tqdm(total=total_steps, initial=step, disable=not is_main, desc=cfg.run_name, dynamic_ncols=True)
    last_save = time.monotonic()  # with `preemption` (SIGTERM / SIGUSR1): checkpoint at the next step boundary
    batches = None
    while step < total_steps:
        epoch, in_epoch = divmod(step, plan.steps_per_epoch)
        if batches is None or in_epoch == 0:
            batches = epoch_steps(plan, dataset, epoch, in_epoch, collate, cfg.data.num_workers)
        t0 = time.perf_counter()
        try:
            micro, failure = next(batches), None
        except (RuntimeError, ValueError) as e:
            failure = bad_sample_message(e)
            if failure is None:
                raise
        # every rank learns of a failed fetch before any collective of the step; all write the checkpoint together
        if agree([failure is not None], device, world)[0]:
            newest = ckpt.list_checkpoints(ckpt_root)
            path = None if step == 0 else newest[-1] if newest and newest[-1].name == f"step_{step}" else \
                _save_periodic(ckpt_root, step, plan, model, optimizer, scheduler, cfg, dataset, n_startup_skips,
                               rank, world, ds)
            bar.close()
            metrics.close()
            raise BadSampleStop(step, failure or "on another rank (see its log)", path)
        t_data = time.perf_counter() - t0
        try:
            row = _train_step(model, ddp, micro, optimizer, scheduler, t_cfg, world, device, use_autocast,
                              dataset.report, ds, flop_model=flop_model)
        except NonFiniteStepError as e:
            e.step = step + 1
            bar.close()
            metrics.close()
            raise
        step += 1
        t_step = time.perf_counter() - t0
        if probe is not None:
            probe.after_step(step)
        row.update(step=step, epoch=round(step / plan.steps_per_epoch, 4), data_s=round(t_data, 4),
                   compute_s=round(t_step - t_data, 4), tokens_per_s=round(row["tokens"] / t_step, 1),
                   samples_per_s=round(row["samples"] / t_step, 2))
        model_flops, hardware_flops = row.pop("model_flops"), row.pop("hardware_flops")
        if peak:
            row["mfu"] = round(model_flops / t_step / (peak * world), 4)
            row["hfu"] = round(hardware_flops / t_step / (peak * world), 4)
        if step % t_cfg.log_every == 0 or step == total_steps:
            row["peak_mem_gb"] = peak_memory_gb(device, world)
            metrics.log(row)
        bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")
        bar.update(1)
        by_steps = bool(t_cfg.save_every) and step % t_cfg.save_every == 0
        by_time = bool(t_cfg.save_every_minutes) and time.monotonic() - last_save >= 60 * t_cfg.save_every_minutes
        stop, by_time = agree([preemption.requested, by_time], device, world)  # every rank decides the same
        if step < total_steps and (by_steps or by_time or stop):
            path = _save_periodic(ckpt_root, step, plan, model, optimizer, scheduler, cfg, dataset, n_startup_skips,
                                  rank, world, ds)
            last_save = time.monotonic()
            if stop:
                bar.close()
                metrics.close()
                raise Preempted(step, preemption.signal_name, path)
    bar.close()
    metrics.close()
    if probe is not None:
        probe.on_end()
    _gather_skip_reports(dataset, n_startup_skips, world)
    # under ZeRO-3 every rank takes part in gathering the weights; rank 0 writes the usual directory format
    state_dict = ds.full_state_dict(model, rank) if ds is not None and ds.stage == 3 else None
    if is_main:
        _save_final(run_dir, model, tokenizer, cfg, dataset, plan, total_steps, state_dict)
    if world > 1:
        dist.barrier()
    return run_dir


def accumulate_gradients(model, ddp, micro: list[dict], world: int, device, use_autocast: bool, ds=None,
                         flop_model: FlopModel | None = None) -> dict:
    """Forward/backward over one step's micro-batches, normalised by the global supervised-token count; with a
    `flop_model`, the step's model and hardware FLOPs summed over ranks (train/flops.py).

    Afterwards `p.grad` holds d(mean token loss over the whole global batch)/dp, whatever the split
    into micro-batches and ranks (under DeepSpeed: the engine's gradient partitions hold it).
    """
    if ds is not None:
        # ZeRO's collectives run in every micro-batch's forward (ZeRO-3) and backward: every rank runs the same
        # number of them, a micro-batch whose samples were all skipped being a no-op batch (and with packing,
        # where the number of micro-batches varies, a rank with fewer runs no-op batches to the largest count)
        micro = [b if "input_ids" in b else _no_op_batch() for b in micro]
        if world > 1:
            most = torch.tensor([len(micro)])
            dist.all_reduce(most, op=dist.ReduceOp.MAX)
            micro += [_no_op_batch() for _ in range(int(most) - len(micro))]
    micro = [b for b in micro if "input_ids" in b]
    if not micro and ddp is not None:
        # every sample of this rank's micro-batches was skipped: still join the gradient all-reduce
        # (with zero loss), or the other ranks would wait for this one forever
        micro = [_no_op_batch()]
    n_local = sum(int(b["labels"][:, 1:].ne(IGNORE_INDEX).sum()) for b in micro)
    counts = [token_counts(b, model.tokens_per_image) for b in micro]  # (real tokens, computed slots)
    flops = [flop_model.step(sequence_lengths(b, model.tokens_per_image), int(b["labels"][:, 1:].ne(IGNORE_INDEX).sum()),
                             b["images"].shape[0], model.tokens_per_image) for b in micro] if flop_model else []
    stats = all_reduce_sum(torch.tensor([float(n_local), float(sum(len(b["ids"]) for b in micro)),
                                         float(sum(c[0] for c in counts)), float(sum(c[1] for c in counts)),
                                         sum(f[0] for f in flops), sum(f[1] for f in flops)],
                                        dtype=torch.float64), world)
    n_global = max(stats[0].item(), 1.0)
    loss_total = torch.zeros((), device=device)
    module = ds.engine if ds is not None else ddp if ddp is not None else model
    for i, batch in enumerate(micro):
        sync = ddp is None or i == len(micro) - 1
        if ds is not None:
            ds.engine.set_gradient_accumulation_boundary(i == len(micro) - 1)
        with (contextlib.nullcontext() if sync else ddp.no_sync()):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_autocast):
                loss_sum, _ = module(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                     batch["images"].to(device), batch["labels"].to(device))
            # DDP and DeepSpeed average over ranks: x world restores the global sum
            if ds is not None:  # and DeepSpeed must not divide by the accumulation steps again
                ds.engine.backward(loss_sum * (world / n_global), scale_wrt_gas=False)
            else:
                (loss_sum * (world / n_global)).backward()
        loss_total += loss_sum.detach()
    loss = all_reduce_sum(loss_total, world).item() / n_global
    tokens, slots = int(stats[2].item()), int(stats[3].item())
    return {"loss": loss, "supervised_tokens": int(n_global), "tokens": tokens,
            "real_token_frac": round(tokens / slots, 4) if slots else 0.0, "samples": int(stats[1].item()),
            "model_flops": stats[4].item(), "hardware_flops": stats[5].item()}


def _no_op_batch() -> dict:
    """One text token with no supervised label: a forward/backward that contributes exactly zero."""
    return {"input_ids": torch.zeros(1, 1, dtype=torch.long), "attention_mask": torch.ones(1, 1, dtype=torch.long),
            "labels": torch.full((1, 1), IGNORE_INDEX), "images": torch.zeros(0, 3, 1, 1), "ids": []}


def _train_step(model, ddp, micro, optimizer, scheduler, t_cfg, world, device, use_autocast, report, ds=None,
                flop_model=None) -> dict:
    for batch in micro:
        for sample_id, reason in batch["skipped"]:
            report.add(sample_id, reason)
        report.truncated += batch["truncated"]
        report.converted_images += batch.get("converted", 0)
    row = accumulate_gradients(model, ddp, micro, world, device, use_autocast, ds, flop_model=flop_model)
    if t_cfg.profile_memory:  # weights, gradients and (from the 2nd step) optimizer states are all live here
        row["live_tensor_gb"] = live_tensor_gb(model, device, world)
    lr = scheduler.get_last_lr()[0]
    # the loss is the global one (all-reduced), the same on every rank: all ranks stop together
    stop_if_non_finite(row["loss"], None, micro, world, applied=False, lr=lr)
    if ds is not None:  # clipping (gradient_clipping = train.grad_clip), optimizer and schedule: the engine
        grad_norm = ds.step()  # DeepSpeed computes the global norm inside its step: checked after it
        stop_if_non_finite(row["loss"], grad_norm, micro, world, applied=True, lr=lr)
        row.update(loss=round(row["loss"], 6), lr=lr, grad_norm=round(grad_norm, 6))
        return row
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # unused this step (the projector, when every micro-batch was text-only): a zero gradient, as
        if p.grad is None:  # DDP and ZeRO give it -- AdamW skips a None gradient but still moves on momentum for a 0
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    if t_cfg.grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, t_cfg.grad_clip)
    else:
        grad_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])) if grads else torch.zeros(())
    stop_if_non_finite(row["loss"], float(grad_norm), micro, world, applied=False, lr=lr)  # synced gradients
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    row.update(loss=round(row["loss"], 6), lr=lr, grad_norm=round(float(grad_norm), 6))
    return row


def epoch_steps(plan: BatchPlan | StreamPlan, dataset, epoch: int, start: int, collate,
                num_workers: int) -> Iterator[list[dict]]:
    """This rank's micro-batches of each step of `epoch`, from step `start` on."""
    if isinstance(plan, StreamPlan):
        yield from plan.epoch_steps(epoch, start, collate, num_workers)
        return
    micro = [mb for gb in plan.global_batches(epoch)[start:] for mb in plan.micro_batches(gb)]
    loader = iter(DataLoader(dataset, batch_sampler=micro, collate_fn=collate, num_workers=num_workers,
                             persistent_workers=False, pin_memory=torch.cuda.is_available()))
    if isinstance(collate, PackingCollator):  # one loader item: a rank's share, already packed into micro-batches
        yield from loader
        return
    while True:
        step = list(itertools.islice(loader, plan.accumulation_steps))
        if not step:
            return
        yield step


def warn_about_repeats(repeated: int, samples: int, global_batch: int) -> None:
    """The last global batch of an epoch is filled with repeated samples; say so when that is not negligible."""
    if samples < global_batch or repeated > 0.01 * samples:
        log.warning("each epoch repeats %d samples (%.1f %% of the %d) to fill its last global batch of %d%s: lower "
                    "train.global_batch_size or add data if that matters", repeated, 100 * repeated / max(1, samples),
                    samples, global_batch, "; the dataset is smaller than ONE global batch" if samples < global_batch
                    else "")


def dataset_size(dataset) -> int:
    """Samples in the dataset (all ranks' for a shard stream)."""
    return dataset.num_samples if isinstance(dataset, ShardDataset) else len(dataset)


def _resume_points(resume: str, ckpt_root: Path) -> list[Path]:
    """Checkpoints to try, newest first: with 'auto' every complete one, else the one named (or none)."""
    if resume == "never":
        return []
    if resume == "auto":
        return ckpt.list_checkpoints(ckpt_root)[::-1]
    path = Path(resume)
    if not (path / "DONE").is_file():
        raise FileNotFoundError(f"train.resume={resume!r} is not a complete checkpoint directory (step_N with DONE); "
                                f"use 'auto', 'never' or a path to one")
    return [path]


# Changing these between a checkpoint and its continuation would silently change the data order.
RESUME_MUST_MATCH = ("data.path", "data.shards", "train.global_batch_size", "train.seed", "data.group_by_modality")
# a shard stream's order also depends on these (and on the number of ranks: checked through the per-rank files)
STREAM_MUST_MATCH = ("data.shuffle_buffer", "data.num_workers")


def data_fingerprint(cfg: RunConfig) -> str:
    """What the data *is*, not what it is called: the JSON's size + sha256 (~0.5 s per GB, once per process), or the
    shard manifest's (which holds every shard's sha256)."""
    source = Path(cfg.data.shards) if cfg.data.shards else Path(cfg.data.path)
    if source.is_dir():
        source = source / "manifest.json"
    return f"{source.stat().st_size} bytes, sha256 {file_sha256(source)[:16]}"


def _restore(path: Path, model, optimizer, scheduler, dataset, n_startup_skips: int, plan, cfg, rank: int,
             ds=None) -> int:
    """Load a periodic checkpoint for an exact continuation; returns its step."""
    state, mine = ckpt.load_checkpoint(path, rank)
    written_by, now_by = state.get("engine", "torch"), "deepspeed" if ds is not None else "torch"
    if written_by != now_by:
        raise ValueError(f"cannot resume from {path}: it was written by the {written_by} engine and this run uses "
                         f"{now_by} (train.deepspeed must be set as it was, or use train.resume=never)")
    saved, now = state["config"], to_dict(cfg)
    for key in RESUME_MUST_MATCH + (STREAM_MUST_MATCH if cfg.data.shards else ()):
        section, name = key.split(".")
        if saved.get(section, {}).get(name) != now[section][name]:
            raise ValueError(f"cannot resume from {path}: {key} was {saved.get(section, {}).get(name)!r} and is now "
                             f"{now[section][name]!r} (use train.resume=never to start again)")
    then, now_fp = state.get("data_fingerprint"), data_fingerprint(cfg)
    if then is not None and then != now_fp:
        raise ValueError(f"cannot resume from {path}: the data's contents changed since the checkpoint (then "
                         f"{then}, now {now_fp}): the same name no longer means the same samples, so the data position "
                         f"would skip or repeat samples; restore the data or use train.resume=never")
    expected = state["data_position"].get("steps_per_epoch")
    if expected is not None and expected != plan.steps_per_epoch:
        raise ValueError(f"cannot resume from {path}: the data gave {expected} steps per epoch then and "
                         f"{plan.steps_per_epoch} now (the dataset changed)")
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    saved_names = state["trainable_names"] if ds is not None else state["trainable"]
    if set(named) != set(saved_names):
        missing, extra = sorted(set(named) - set(saved_names)), sorted(set(saved_names) - set(named))
        raise ValueError(f"cannot resume from {path}: trainable parameters differ (not in checkpoint: {missing[:5]}, "
                         f"not trainable now: {extra[:5]})")
    if ds is not None:  # weights (fp32 masters), optimizer and schedule: the engine's own files (collective)
        ds.load(path)
    else:
        for name, tensor in state["trainable"].items():
            named[name].data.copy_(tensor)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    ckpt.set_rng_state(mine["rng"])
    report = mine.get("report", {})
    del dataset.report.skipped[n_startup_skips:]
    dataset.report.skipped.extend(tuple(x) for x in report.get("skipped", []))
    dataset.report.truncated = report.get("truncated", 0)
    dataset.report.converted_images = report.get("converted_images", 0)
    log.info("resumed from %s at step %d (epoch %d, batch %d of the epoch)", path, state["step"],
             state["data_position"]["epoch"], state["data_position"]["step_in_epoch"])
    return state["step"]


def _save_periodic(ckpt_root, step, plan, model, optimizer, scheduler, cfg, dataset, n_startup_skips, rank, world,
                   ds=None) -> None:
    epoch, in_epoch = divmod(step, plan.steps_per_epoch)
    payload = None
    if rank == 0:
        payload = {
            "step": step, "world_size": world,
            "data_position": {"epoch": epoch, "step_in_epoch": in_epoch, "steps_per_epoch": plan.steps_per_epoch},
            "config": to_dict(cfg), "data_fingerprint": data_fingerprint(cfg),
        }
        if ds is not None:  # weights, optimizer and schedule: in the engine's files (step_N/deepspeed/)
            payload.update(engine="deepspeed", zero_stage=ds.stage,
                           trainable_names=[n for n, p in model.named_parameters() if p.requires_grad])
        else:
            payload.update(trainable={n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
                           optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict())
    mine = {"rng": ckpt.rng_state(),
            "report": {"skipped": dataset.report.skipped[n_startup_skips:], "truncated": dataset.report.truncated,
                       "converted_images": dataset.report.converted_images}}
    path = ckpt.save_checkpoint(ckpt_root, step, payload, cfg.train.keep_last, mine, rank, world,
                                write_collective=ds.save if ds is not None else None)
    if rank == 0:
        log.info("saved checkpoint %s", path)
    return path


def _gather_skip_reports(dataset, n_startup_skips: int, world: int) -> None:
    """Rank 0's report gets every rank's runtime skips and truncations (start-up rejections are the same on all)."""
    if world == 1:
        return
    mine = (dataset.report.skipped[n_startup_skips:], dataset.report.truncated, dataset.report.converted_images)
    gathered: list = [None] * world
    dist.all_gather_object(gathered, mine)
    del dataset.report.skipped[n_startup_skips:]
    for skipped, _, _ in gathered:
        dataset.report.skipped.extend(skipped)
    dataset.report.truncated = sum(t for _, t, _ in gathered)
    dataset.report.converted_images = sum(c for _, _, c in gathered)


def _save_final(run_dir: Path, model: LlavaModel, tokenizer, cfg: RunConfig, dataset, plan, total_steps,
                state_dict: dict | None = None) -> None:
    """`state_dict`: the whole model's weights when the modules hold only partitions (gathered from ZeRO-3)."""
    extra = {"template": cfg.model.template, "trained": {"run_name": cfg.run_name, "steps": total_steps}}
    if cfg.train.save_full_model:
        model.save_pretrained(run_dir, tokenizer, extra, state_dict)
    else:
        model.save_projector(run_dir, extra, state_dict)
    report = {
        "steps": total_steps, "samples": dataset_size(dataset),
        "repeated_to_fill_last_batch_per_epoch": plan.repeated_per_epoch(),
        "rejected_or_skipped": dataset.report.counts(), "truncated": dataset.report.truncated,
        "images_converted": dataset.report.converted_images,
    }
    if dataset.report.skipped:
        distinct = dataset.report.distinct()
        with (run_dir / "skipped.jsonl").open("w") as f:
            for sample_id, reason in distinct:
                f.write(json.dumps({"id": sample_id, "reason": reason}) + "\n")
        log.warning("%d sample(s) skipped: %s (listed in %s)", len(distinct), report["rejected_or_skipped"],
                    run_dir / "skipped.jsonl")
    plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss.png")
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))  # last: marks the run as finished
    log.info("saved %s to %s", "model" if cfg.train.save_full_model else "projector", run_dir)


def _setup_logging(run_dir: Path | None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if run_dir is not None:
        handlers.append(logging.FileHandler(run_dir / "train.log"))
    logging.basicConfig(level=logging.INFO if run_dir is not None else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=handlers, force=True)
