"""A run's state between steps -- where it is, what it has skipped, its RNG -- and what is written from it:
periodic checkpoints (with the engine's own files), the exact resume from one, and the final output directory.

    state = RunState(cfg, plan, dataset, rank, world)
    state.resume(engine, model)        # from the newest usable checkpoint (train.resume), or stay at step 0
    state.save_checkpoint(engine, model)
    state.save_final(engine, model, tokenizer)
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from llava_sft.config import RunConfig, to_dict
from llava_sft.data.catalog import file_sha256
from llava_sft.train import checkpoint as ckpt
from llava_sft.train.collectives import gather_objects
from llava_sft.train.logger import plot_loss_curve

log = logging.getLogger("llava_sft.train")

# Changing these between a checkpoint and its continuation would silently change the data order.
RESUME_MUST_MATCH = ("data.path", "data.shards", "train.global_batch_size", "train.seed", "data.group_by_modality",
                     "data.group_by_length")
# a shard stream's order also depends on these (and on the number of ranks: checked through the per-rank files)
STREAM_MUST_MATCH = ("data.shuffle_buffer", "data.num_workers")


def data_fingerprint(cfg: RunConfig) -> str:
    """What the data *is*, not what it is called: the JSON's size + sha256 (~0.5 s per GB, once per process), or the
    shard manifest's (which holds every shard's sha256)."""
    source = Path(cfg.data.shards) if cfg.data.shards else Path(cfg.data.path)
    if source.is_dir():
        source = source / "manifest.json"
    return f"{source.stat().st_size} bytes, sha256 {file_sha256(source)[:16]}"


@dataclass
class RunState:
    cfg: RunConfig
    plan: object  # BatchPlan | StreamPlan
    dataset: object  # its `report` counts skipped, truncated and converted samples
    rank: int
    world: int
    step: int = 0
    startup_skips: int = field(init=False)  # rejected at start-up: the same on every rank, never checkpointed
    parameters: dict = field(default_factory=dict)  # module -> (trainable, total), as logged at start (report.json)

    def __post_init__(self):
        self.startup_skips = len(self.dataset.report.skipped)

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.train.output_dir)

    @property
    def checkpoint_root(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def report(self):
        return self.dataset.report

    # ------------------------------------------------------------------------------------ resume
    def resume_points(self) -> list[Path]:
        """Checkpoints to try, newest first: with 'auto' every complete one, else the one named (or none)."""
        resume = self.cfg.train.resume
        if resume == "never":
            return []
        if resume == "auto":
            return ckpt.list_checkpoints(self.checkpoint_root)[::-1]
        path = Path(resume)
        if not (path / "DONE").is_file():
            raise FileNotFoundError(f"train.resume={resume!r} is not a complete checkpoint directory (step_N with "
                                    f"DONE); use 'auto', 'never' or a path to one")
        return [path]

    def resume(self, engine, model) -> None:
        """Continue from the newest checkpoint that loads (resume=auto falls back past a corrupt one)."""
        candidates = self.resume_points()
        for i, path in enumerate(candidates):
            try:
                self.restore(path, engine, model)
                return
            except ckpt.CorruptCheckpoint as e:
                if i + 1 == len(candidates):
                    raise
                log.warning("%s; falling back to the previous checkpoint, %s", e, candidates[i + 1])

    def restore(self, path: Path, engine, model) -> None:
        """Load a periodic checkpoint for an exact continuation."""
        state, this_rank = ckpt.load_checkpoint(path, self.rank)
        saved, now, default = state["config"], to_dict(self.cfg), to_dict(RunConfig())
        for key in RESUME_MUST_MATCH + (STREAM_MUST_MATCH if self.cfg.data.shards else ()):
            section, name = key.split(".")
            # a key the checkpoint's config lacks is newer than the checkpoint: that run had its default
            then = saved.get(section, {}).get(name, default[section][name])
            if then != now[section][name]:
                raise ValueError(f"cannot resume from {path}: {key} was {then!r} and is "
                                 f"now {now[section][name]!r} (use train.resume=never to start again)")
        then, now_fp = state.get("data_fingerprint"), data_fingerprint(self.cfg)
        if then is not None and then != now_fp:
            raise ValueError(f"cannot resume from {path}: the data's contents changed since the checkpoint (then "
                             f"{then}, now {now_fp}): the same name no longer means the same samples, so the data "
                             f"position would skip or repeat samples; restore the data or use train.resume=never")
        expected = state["data_position"].get("steps_per_epoch")
        if expected is not None and expected != self.plan.steps_per_epoch:
            raise ValueError(f"cannot resume from {path}: the data gave {expected} steps per epoch then and "
                             f"{self.plan.steps_per_epoch} now (the dataset changed)")
        engine.restore(state, path, model)  # weights, optimizer, schedule (collective for sharded engines)
        ckpt.set_rng_state(this_rank["rng"])
        report, saved_report = self.report, this_rank.get("report", {})
        del report.skipped[self.startup_skips:]
        report.skipped.extend(tuple(x) for x in saved_report.get("skipped", []))
        report.truncated = saved_report.get("truncated", 0)
        report.converted_images = saved_report.get("converted_images", 0)
        self.step = state["step"]
        log.info("resumed from %s at step %d (epoch %d, batch %d of the epoch)", path, state["step"],
                 state["data_position"]["epoch"], state["data_position"]["step_in_epoch"])

    # -------------------------------------------------------------------------------------- save
    def save_checkpoint(self, engine, model) -> Path:
        """Collective: a periodic checkpoint of this step (rank 0's state.pt, every rank's RNG and report, the
        engine's own files)."""
        epoch, in_epoch = divmod(self.step, self.plan.steps_per_epoch)
        payload = None
        if self.rank == 0:
            payload = {"step": self.step, "world_size": self.world,
                       "data_position": {"epoch": epoch, "step_in_epoch": in_epoch,
                                         "steps_per_epoch": self.plan.steps_per_epoch},
                       "config": to_dict(self.cfg), "data_fingerprint": data_fingerprint(self.cfg)}
            payload.update(engine.checkpoint_state(model))
        this_rank = {"rng": ckpt.rng_state(),
                "report": {"skipped": self.report.skipped[self.startup_skips:], "truncated": self.report.truncated,
                           "converted_images": self.report.converted_images}}
        path = ckpt.save_checkpoint(self.checkpoint_root, self.step, payload, self.cfg.train.keep_last, this_rank,
                                    self.rank, self.world, write_collective=engine.write_checkpoint)
        if self.rank == 0:
            log.info("saved checkpoint %s", path)
        return path

    def checkpoint_of_this_step(self, engine, model) -> Path | None:
        """The checkpoint of the current step, written now unless it exists (None at step 0)."""
        if self.step == 0:
            return None
        newest = ckpt.list_checkpoints(self.checkpoint_root)
        if newest and newest[-1].name == f"step_{self.step}":
            return newest[-1]
        return self.save_checkpoint(engine, model)

    def gather_reports(self) -> None:
        """Rank 0's report gets every rank's runtime skips and truncations (start-up rejections are the same on
        all)."""
        if self.world == 1:
            return
        report = self.report
        this_rank = (report.skipped[self.startup_skips:], report.truncated, report.converted_images)
        gathered = gather_objects(this_rank, self.world)
        del report.skipped[self.startup_skips:]
        for skipped, _, _ in gathered:
            report.skipped.extend(skipped)
        report.truncated = sum(t for _, t, _ in gathered)
        report.converted_images = sum(c for _, _, c in gathered)

    def save_final(self, engine, model, tokenizer, total_steps: int) -> None:
        """Collective: every rank's report and (sharded engines) weights gathered; rank 0 writes the usual model
        (or projector) directory, report.json last (it marks the run as finished)."""
        self.gather_reports()
        state_dict = engine.full_state_dict(model, self.rank)  # None where the modules' weights are whole
        if self.rank != 0:
            return
        cfg, run_dir = self.cfg, self.run_dir
        extra = {"template": cfg.model.template, "trained": {"run_name": cfg.run_name, "steps": total_steps}}
        if cfg.train.save_full_model:
            model.save_pretrained(run_dir, tokenizer, extra, state_dict)
        else:
            model.save_projector(run_dir, extra, state_dict)
        report = self.report
        summary = {
            "steps": total_steps, "samples": self.dataset.num_samples,
            "repeated_to_fill_last_batch_per_epoch": self.plan.repeated_per_epoch(),
            "rejected_or_skipped": report.counts(), "truncated": report.truncated,
            "images_converted": report.converted_images,
            "parameters": {name: {"trainable": t, "total": n} for name, (t, n) in self.parameters.items()},
        }
        if report.skipped:
            distinct = report.distinct()
            with (run_dir / "skipped.jsonl").open("w") as f:
                for sample_id, reason in distinct:
                    f.write(json.dumps({"id": sample_id, "reason": reason}) + "\n")
            log.warning("%d sample(s) skipped: %s (listed in %s)", len(distinct), summary["rejected_or_skipped"],
                        run_dir / "skipped.jsonl")
        plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss.png")
        (run_dir / "report.json").write_text(json.dumps(summary, indent=2))
        log.info("saved %s to %s", "model" if cfg.train.save_full_model else "projector", run_dir)
