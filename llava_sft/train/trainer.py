"""The one training core. Stage 1 and Stage 2 differ only in their config.

Stage 1 (feature alignment):   train.train_projector=true  train.train_llm=false  data.template=plain
Stage 2 (instruction tuning):  train.train_projector=true  train.train_llm=true   data.template=vicuna_v1
                               train.pretrained_projector=<stage-1 output dir>
Stage 3 (preference, DPO):     as Stage 2 from the Stage-2 output, plus a `dpo:` section: data.path holds
                               preference pairs (data/preference.py), the loss is model/dpo.py's, a mean over the
                               global batch's pairs as SFT's is over its supervised tokens; the reference is prepared
                               before step 1 (train/reference.py)

Per optimizer step: the micro-batches of this rank are loaded first, the supervised tokens of the
whole global batch (all micro-batches, all ranks) are counted, and each micro-batch's summed
token loss is divided by that count, so accumulating k micro-batches equals one k-times-larger
batch exactly (train.loss_normalization=global_tokens; `micro_batch_mean` weighs as HF Trainer < 4.46
and so the LLaVA-1.5 run did: accumulate_gradients). Then: grad clipping, AdamW, warmup + cosine schedule.

With `data.packing` (data/packing.py) the same samples form each step, but a rank's share is loaded
at once and packed into rows of `data.pack_max_tokens` tokens, `train.micro_batch_size` rows per
forward pass: only the number of forward passes per step changes, not the loss.

How the model is distributed and stepped is the engine's business (train/engines/: ddp, deepspeed, fsdp2, chosen
by train.engine), all launched with torchrun; what is built before the first step is train/build.py's, and what a
checkpoint holds is train/state.py's.
"""
from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path

import torch

from llava_sft.config import RunConfig, check_paths, save_config, to_dict, validate
from llava_sft.constants import IGNORE_INDEX
from llava_sft.data.packing import token_counts
from llava_sft.data.template_check import check_run as check_chat_template
from llava_sft.train.build import (
    build,
    device_and_ranks,
    enable_gradient_checkpointing,
    log,
    log_trainable,
    make_collator,
    make_plan,
    pack_budget,
    seed_everything,
    setup_logging,
    warn_about_repeats,
)
from llava_sft.train.collectives import agree, barrier, sum_over_ranks, sum_tensor_over_ranks
from llava_sft.train.engines import Engine, make_engine
from llava_sft.train.engines.ddp import DDPEngine
from llava_sft.train.flops import FlopModel, peak_flops, sequence_lengths
from llava_sft.train.guards import (
    BadSampleStop,
    NonFiniteStepError,
    Preempted,
    PreemptionNotice,
    bad_sample_message,
    stop_if_non_finite,
)
from llava_sft.train.logger import MetricsLogger
from llava_sft.train.measure import live_tensor_gb, peak_memory_gb
from llava_sft.train.optim import check_master_weights, lr_lambda, param_groups
from llava_sft.train.probe import Probe
from llava_sft.train.rundir import RunDirLock
from llava_sft.train.state import RunState

__all__ = ["DDPEngine", "accumulate_gradients", "build", "lr_lambda", "make_collator", "make_plan", "param_groups",
           "peak_memory_gb", "seed_everything", "train", "train_step"]


def train(cfg: RunConfig) -> Path:
    validate(cfg)  # load_config did already; a config built in code gets the same checks before anything loads
    check_paths(cfg)  # before any weights load (a missing data file used to show after the 7B model had loaded)
    check_chat_template(cfg)  # the tokenizer's own chat template against data.template, as cheaply
    # one live run per output_dir (rank 0 holds the lock; a refusal there ends the torchrun job before any work)
    lock = RunDirLock(Path(cfg.train.output_dir)).acquire() if int(os.environ.get("RANK", "0")) == 0 else None
    try:
        with PreemptionNotice() as preemption:  # the signal handlers are the previous ones again afterwards
            return _train(cfg, preemption)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: RunConfig, preemption: PreemptionNotice) -> Path:
    train_cfg, run_dir = cfg.train, Path(cfg.train.output_dir)
    engine = make_engine(cfg, int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")))
    rank, world, device = device_and_ranks(train_cfg.device)
    engine.init_distributed(device.type == "cuda")
    if train_cfg.resume == "auto" and (run_dir / "report.json").is_file():
        setup_logging(None)
        log.warning("%s already holds a finished run (report.json): nothing to do. Use train.resume=never to "
                    "train it again from scratch, or another train.output_dir.", run_dir)
        return run_dir
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        if train_cfg.resume == "never":
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
            (run_dir / "report.json").unlink(missing_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    barrier(world)
    setup_logging(run_dir if rank == 0 else None, verbose=int(os.environ.get("LOCAL_RANK", "0")) == 0)
    log.info("training on %s (train.device=%s), world size %d, engine %s", device, train_cfg.device, world,
             engine.name)
    seed_everything(train_cfg.seed)

    engine.before_model_build()  # ZeRO-3: the LLM is loaded partitioned
    model, tokenizer, dataset = build(cfg, device, rank, world)
    parameters = model.set_trainable(train_cfg.train_projector, train_cfg.train_llm, train_cfg.train_vision_tower)
    log_trainable(parameters)
    if train_cfg.train_llm and not train_cfg.save_full_model:  # the default is False, right for Stage 1 only
        log.warning("train.train_llm=true but train.save_full_model=false: the run will save the projector only and "
                    "the trained LLM%s will be lost at the end -- set train.save_full_model=true (the Stage-2 "
                    "recipes do)", " (its LoRA adapters)" if cfg.model.lora else "")
    if train_cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model.llm, reentrant=engine.reentrant_checkpointing)
    # from_pretrained returns the LLM in eval mode, and transformers checkpoints a decoder layer only in training
    # mode (`if self.gradient_checkpointing and self.training`): without this, gradient checkpointing was a silent
    # no-op for every LLM loaded from a directory, and dropout (LoRA's too) was off. The vision tower stays in
    # eval mode (VisionTower.train); generation and evaluation load with .eval() (LlavaModel.from_pretrained).
    model.train()
    plan = make_plan(cfg, dataset, world, rank)
    state = RunState(cfg, plan, dataset, rank, world, parameters=parameters)
    total_steps = train_cfg.max_steps or math.ceil(train_cfg.epochs * plan.steps_per_epoch)
    warn_about_repeats(plan.repeated_per_epoch(), dataset.num_samples, train_cfg.global_batch_size)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("nothing to train: set train.train_projector, train.train_llm and/or "
                         "train.train_vision_tower")
    check_master_weights(model, engine.keeps_fp32_masters)
    # FLOPs per micro-batch from its real shapes (train/flops.py), for `mfu` / `hfu` when the peak is known
    peak = peak_flops(train_cfg.flops_per_second_peak, device)
    flop_model = FlopModel.of(model, train_cfg.gradient_checkpointing, engine.reentrant_checkpointing) if peak else None
    engine.setup(model, lambda m: param_groups(m, train_cfg.weight_decay, train_cfg.lr, train_cfg.projector_lr,
                                               train_cfg.vision_tower_lr),
                 lr_lambda(total_steps, train_cfg.warmup_ratio, train_cfg.lr_schedule))
    probe = Probe.from_env(rank)  # python -m llava_sft.preflight measures the run from inside (train/probe.py)
    if probe is not None:
        probe.on_setup(model, engine.optimizer, engine, train_cfg.gradient_checkpointing,
                       engine.reentrant_checkpointing)
    collate = make_collator(cfg, tokenizer, model.tokens_per_image)
    use_autocast = engine.autocast(device)
    if cfg.dpo is not None:  # Stage 3's reference (train/reference.py): before a resume loads trained weights
        from llava_sft.train.reference import prepare as prepare_reference

        prepare_reference(cfg, engine, model, dataset, collate, device, use_autocast, preemption)
    state.resume(engine, model)
    if cfg.data.packing:
        log.info("%d samples, %d steps/epoch, %d total steps; global batch %d = %d rank(s) x %d samples, packed "
                 "into rows of <= %d tokens, %d row(s) per forward pass (%s attention)", dataset.num_samples,
                 plan.steps_per_epoch, total_steps, train_cfg.global_batch_size, world, plan.micro_batch_size,
                 pack_budget(cfg), train_cfg.micro_batch_size, model.attn_implementation)
    else:
        log.info("%d samples, %d steps/epoch, %d total steps; global batch %d = %d rank(s) x %d accumulation x %d "
                 "micro", dataset.num_samples, plan.steps_per_epoch, total_steps, train_cfg.global_batch_size, world,
                 plan.accumulation_steps, train_cfg.micro_batch_size)
    metrics = MetricsLogger(run_dir, rank == 0, train_cfg.tensorboard, train_cfg.wandb_project, cfg.run_name,
                            to_dict(cfg), resume_step=state.step)
    from tqdm import tqdm

    bar = tqdm(total=total_steps, initial=state.step, disable=rank != 0, desc=cfg.run_name, dynamic_ncols=True)
    last_save = time.monotonic()  # with `preemption` (SIGTERM / SIGUSR1): checkpoint at the next step boundary
    batches = None

    def stop(error: Exception) -> None:
        if batches is not None:  # the loader's workers shut down now, by their parent (llava_sft/preemption.py)
            batches.close()
        bar.close()
        metrics.close()
        raise error

    while state.step < total_steps:
        epoch, in_epoch = divmod(state.step, plan.steps_per_epoch)
        if batches is None or in_epoch == 0:
            batches = plan.epoch_steps(epoch, in_epoch, collate, cfg.data.num_workers, dataset)
        t0 = time.perf_counter()
        try:
            micro, failure = next(batches), None
        except (RuntimeError, ValueError) as e:
            failure = bad_sample_message(e)
            if failure is None:
                raise
        # every rank learns of a failed fetch before any collective of the step; all write the checkpoint together
        if agree([failure is not None], world)[0]:
            path = state.checkpoint_of_this_step(engine, model)
            stop(BadSampleStop(state.step, failure or "on another rank (see its log)", path))
        t_data = time.perf_counter() - t0
        try:
            row = train_step(engine, micro, device, use_autocast, dataset.report, flop_model)
        except NonFiniteStepError as e:
            e.step = state.step + 1
            stop(e)
        state.step += 1
        t_step = time.perf_counter() - t0
        if probe is not None:
            probe.after_step(state.step)
        row.update(step=state.step, epoch=round(state.step / plan.steps_per_epoch, 4), data_s=round(t_data, 4),
                   compute_s=round(t_step - t_data, 4), tokens_per_s=round(row["tokens"] / t_step, 1),
                   samples_per_s=round(row["samples"] / t_step, 2))
        model_flops, hardware_flops = row.pop("model_flops"), row.pop("hardware_flops")
        if peak:
            row["mfu"] = round(model_flops / t_step / (peak * world), 4)
            row["hfu"] = round(hardware_flops / t_step / (peak * world), 4)
        if state.step % train_cfg.log_every == 0 or state.step == total_steps:
            row["peak_mem_gb"] = peak_memory_gb(device, world)
            metrics.log(row)
        bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")
        bar.update(1)
        by_steps = bool(train_cfg.save_every) and state.step % train_cfg.save_every == 0
        by_time = bool(train_cfg.save_every_minutes) and \
            time.monotonic() - last_save >= 60 * train_cfg.save_every_minutes
        preempted, by_time = agree([preemption.requested, by_time], world)  # every rank decides the same
        if state.step < total_steps and (by_steps or by_time or preempted):
            path = state.save_checkpoint(engine, model)
            last_save = time.monotonic()
            if preempted:
                stop(Preempted(state.step, preemption.signal_name, path))
    bar.close()
    metrics.close()
    if probe is not None:
        probe.on_end()
    state.save_final(engine, model, tokenizer, total_steps)
    barrier(world)
    return run_dir


def accumulate_gradients(engine: Engine, micro: list[dict], device, use_autocast: bool,
                         flop_model: FlopModel | None = None) -> dict:
    """Forward/backward over one step's micro-batches, weighted as train.loss_normalization says; with a
    `flop_model`, the step's model and hardware FLOPs summed over ranks (train/flops.py).

    Afterwards the gradients (in `p.grad`, DDP's buckets, ZeRO's partitions or FSDP2's shards) hold, for N the
    supervised tokens of the global batch, L_ri the summed token loss of micro-batch i of rank r and n_ri its tokens:
      global_tokens      d(sum L_ri / N)/dp: the mean token loss of the whole global batch, whatever the split
                         into micro-batches and ranks;
      micro_batch_mean   d(sum L_ri / n_ri / (world x k))/dp, k this rank's micro-batches per step (a micro-batch
                         without supervised tokens adds 0; HF's cross-entropy would have given nan).
    The loss returned is that same quantity, summed over ranks.
    """
    planned = len(micro)  # this rank's accumulation steps (before align adds no-op batches)
    micro, world, tpi = engine.align(micro), engine.world, engine.model.tokens_per_image
    supervised = [int(b["labels"][:, 1:].ne(IGNORE_INDEX).sum()) for b in micro]
    # what the loss is a mean over: supervised tokens (SFT), or preference pairs (Stage 3: model/dpo.py)
    units = [b["pairs"] if "pairs" in b else n for b, n in zip(micro, supervised, strict=True)]
    counts = [token_counts(b, tpi) for b in micro]  # (real tokens, computed slots)
    flops = [flop_model.step(sequence_lengths(b, tpi), n, b["images"].shape[0], tpi)
             for b, n in zip(micro, supervised, strict=True)] if flop_model else []
    stats = sum_over_ranks([sum(units), sum(len(b["ids"]) for b in micro), sum(c[0] for c in counts),
                            sum(c[1] for c in counts), sum(f[0] for f in flops), sum(f[1] for f in flops)], world)
    n_global = max(stats[0], 1.0)
    # the weight of each micro-batch's summed loss; the engines average gradients over ranks (x world undoes it)
    mean_of_means = loss_normalization(engine) == "micro_batch_mean"
    if mean_of_means:  # HF Trainer < 4.46: the mean over ranks and accumulation steps of
        weights = [1.0 / (max(planned, 1) * max(n, 1)) for n in units]  # each micro-batch's token mean
    else:  # global_tokens: every supervised token (every pair) of the global batch weighs the same
        weights = [world / n_global] * len(micro)
    loss_total = torch.zeros((), device=device)
    extra = None  # Stage 3: sums of model/dpo.py's STAT_NAMES over this rank's pairs
    for i, (batch, weight) in enumerate(zip(micro, weights, strict=True)):
        with engine.accumulating(last=i == len(micro) - 1):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_autocast):
                out = engine.module(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                    batch["images"].to(device), batch["labels"].to(device), **batch_extras(batch, device))
            loss_sum = out[0]
            engine.backward(loss_sum * weight)
        loss_total += loss_sum.detach() * weight if mean_of_means else loss_sum.detach()
        if len(out) > 2:
            extra = out[2].detach() if extra is None else extra + out[2].detach()
    # the quantity whose gradient was taken
    loss = sum_tensor_over_ranks(loss_total, world).item() / (world if mean_of_means else n_global)
    tokens, slots = int(stats[2]), int(stats[3])
    row = {"loss": loss, "pairs" if extra is not None else "supervised_tokens": int(n_global), "tokens": tokens,
           "real_token_frac": round(tokens / slots, 4) if slots else 0.0, "samples": int(stats[1]),
           "model_flops": stats[4], "hardware_flops": stats[5]}
    if extra is not None:  # means over the global batch's pairs (rewards, margins, accuracy, log-probs)
        from llava_sft.model.dpo import STAT_NAMES

        means = sum_tensor_over_ranks(extra.double(), world) / n_global
        row.update({name: round(float(v), 6) for name, v in zip(STAT_NAMES, means.tolist(), strict=True)})
    return row


def batch_extras(batch: dict, device) -> dict:
    """The model's keyword arguments beyond the four tensors: AnyRes sizes; for preference pairs the image index,
    the number of pairs and a precomputed reference's log-probs."""
    extras = {"image_sizes": batch.get("image_sizes")}
    if batch.get("image_index") is not None:
        extras["image_index"] = batch["image_index"].to(device)
    if "pairs" in batch:
        extras["pairs"] = batch["pairs"]
        if "reference_logps" in batch:
            extras["reference_logps"] = batch["reference_logps"].to(device)
    return extras


def loss_normalization(engine: Engine) -> str:
    """train.loss_normalization (engines made around a bare model in tests and benchmarks have no config)."""
    return getattr(engine.train_cfg, "loss_normalization", "global_tokens")


def train_step(engine: Engine, micro: list[dict], device, use_autocast: bool, report,
               flop_model: FlopModel | None = None) -> dict:
    """One optimizer step: the micro-batches' skips counted, gradients accumulated, the loss and the gradient norm
    checked (train/guards.py), then the engine's step."""
    for batch in micro:
        for sample_id, reason in batch["skipped"]:
            report.add(sample_id, reason)
        report.truncated += batch["truncated"]
        report.converted_images += batch.get("converted", 0)
    row = accumulate_gradients(engine, micro, device, use_autocast, flop_model)
    if engine.train_cfg.profile_memory:  # weights, gradients and (from the 2nd step) optimizer states are live here
        row["live_tensor_gb"] = live_tensor_gb(engine.model, device, engine.world)
    lr, world = engine.lr, engine.world
    # the loss is the global one (all-reduced), the same on every rank: all ranks stop together
    stop_if_non_finite(row["loss"], None, micro, world, applied=False, lr=lr)
    grad_norm = engine.step(lambda norm, applied: stop_if_non_finite(row["loss"], norm, micro, world, applied, lr=lr))
    row.update(loss=round(row["loss"], 6), lr=lr, grad_norm=round(grad_norm, 6))
    return row
