"""A non-finite loss stops the run (issue: `train.lr=1e12` trained on in NaN, rotated the good checkpoints out and
wrote a NaN model with exit 0). Through the CLI, as a user hits it: exit 3, one line naming the step and its
samples, no final model and no report, every checkpoint left from a finite step; under DeepSpeed on 2 ranks both
ranks stop at the same step (no hang)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_prep.make_shapes import generate as make_shapes
from llava_sft.config import save_config
from tests.tiny import run_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes_nan")
    make_shapes(out, seed=4, image_size=32, n_stage1=4, n_stage2=32, n_eval=2, text_only_frac=0.25)
    return out


def run_cli(cfg, tmp_path: Path, nproc: int = 1) -> subprocess.CompletedProcess:
    cfg_file = tmp_path / "run.yaml"
    save_config(cfg, cfg_file)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", DS_ACCELERATOR="cpu",
               PYTHONPATH=str(REPO))
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
                 "29783"] if nproc > 1 else [sys.executable])
    return subprocess.run([*launcher, "-m", "llava_sft.train", str(cfg_file)], env=env, capture_output=True,
                          text=True, timeout=400)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("engine", ["plain", "zero2"])
def test_a_non_finite_loss_stops_the_run_and_saves_nothing_from_it(llama_tokenizer_dir, shapes, tmp_path, engine):
    out = tmp_path / "run"
    cfg = run_config(llama_tokenizer_dir, shapes, out, stage=2, max_steps=6, save_every=1, keep_last=2, lr=1e12,
                     global_batch_size=4, micro_batch_size=2, grad_clip=0.0)
    if engine == "zero2":
        cfg.train.deepspeed = str(REPO / "configs" / "deepspeed" / "zero2.json")
    proc = run_cli(cfg, tmp_path, nproc=2 if engine == "zero2" else 1)
    if engine == "plain":
        assert proc.returncode == 3, proc.stderr[-3000:]
    else:  # torchrun exits 1 when a rank fails and reports each rank's own exit code
        assert proc.returncode != 0 and "exitcode  : 3" in proc.stderr, proc.stderr[-3000:]
    [line] = [ln for ln in proc.stderr.splitlines() if ln.startswith("[train] error:")]  # one line, from rank 0
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    bad_step = len(rows) + 1
    assert f"step {bad_step}: loss nan" in line or f"step {bad_step}: loss inf" in line
    assert "train.lr" in line and "Samples of the step:" in line
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert not (out / "report.json").exists() and not (out / "projector.safetensors").exists()
    steps = sorted(int(p.name.split("_")[1]) for p in (out / "checkpoints").glob("step_*"))
    assert steps and max(steps) < bad_step
    if engine == "plain":  # the saved weights are finite (DeepSpeed's are in its own shard format)
        trainable = torch.load(out / "checkpoints" / f"step_{max(steps)}" / "state.pt", weights_only=False)
        assert all(torch.isfinite(t).all() for t in trainable["trainable"].values())


@pytest.mark.timeout(300)
@pytest.mark.parametrize("workers", [0, 1])
def test_a_bad_sample_at_run_time_checkpoints_then_stops_naming_it(llama_tokenizer_dir, tmp_path, workers):
    """Issue: a corrupt image found when training reached it (possibly hour 19) stopped the run without a checkpoint
    of the steps before it. Now: the last complete step is checkpointed on every rank, then one line names the sample
    and the fix, exit 4; after the fix the same command continues from that checkpoint."""
    data = tmp_path / "data"
    make_shapes(data, seed=4, image_size=32, n_stage1=32, n_stage2=4, n_eval=2, text_only_frac=0.0)
    records = json.loads((data / "stage1.json").read_text())
    bad = records[21]
    (data / "images" / bad["image"]).write_bytes(b"")  # exists, does not decode
    out = tmp_path / "run"
    cfg = run_config(llama_tokenizer_dir, data, out, stage=1, max_steps=8, global_batch_size=4, micro_batch_size=2)
    cfg.data.num_workers = workers
    cfg.data.check_images_at_start = "stat"  # passes: as a file that broke after the start-up check would
    proc = run_cli(cfg, tmp_path)
    assert proc.returncode == 4, proc.stderr[-3000:]
    [line] = [ln for ln in proc.stderr.splitlines() if ln.startswith("[train] error:")]
    step = int(line.split("step ")[1].split(":")[0])
    assert bad["id"] in line and "corrupt image" in line and "data.bad_samples=skip" in line
    assert step > 1 and f"a checkpoint of step {step - 1} was written" in line
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step_{step - 1}"]
    (data / "images" / bad["image"]).write_bytes((data / "images" / records[0]["image"]).read_bytes())  # fixed
    proc = run_cli(cfg, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / f'step_{step - 1}'}" in proc.stderr
