"""Two CPU processes (torchrun, gloo DDP) train exactly like one process with the same global batch."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from data_prep.make_shapes import generate as make_shapes
from llava_sft.config import save_config
from tests.tiny import run_config

pytestmark = pytest.mark.slow  # multi-process or full runs: `pytest -m 'not slow'` skips them


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.timeout(300)
def test_two_ranks_match_one_rank(llama_tokenizer_dir, tmp_path):
    data = tmp_path / "data"
    make_shapes(data, seed=1, image_size=32, n_stage1=8, n_stage2=48, n_eval=5, text_only_frac=0.25)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    runs = {}
    for world in (1, 2):
        cfg = run_config(llama_tokenizer_dir, data, tmp_path / f"world{world}", stage=2, max_steps=4,
                         global_batch_size=8, micro_batch_size=2 if world == 2 else 8, lr=3e-3)
        cfg.data.group_by_modality = True
        cfg_file = tmp_path / f"world{world}.yaml"
        save_config(cfg, cfg_file)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port",
               str(29600 + world), "-m", "llava_sft.train", str(cfg_file)]
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=280)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[world] = losses(tmp_path / f"world{world}")
    assert len(runs[1]) == len(runs[2]) == 4
    assert runs[1][-1] < runs[1][0]  # it trains
    # same global batch, token-normalised loss (not a mean of per-rank or per-micro-batch means):
    # 2 ranks x 2 accumulation x micro-batch 2 == 1 rank x micro-batch 8
    assert runs[2] == pytest.approx(runs[1], rel=2e-4)


@pytest.mark.timeout(300)
def test_a_rank_whose_samples_are_all_skipped_does_not_hang_and_its_skips_are_reported(llama_tokenizer_dir, tmp_path):
    """Images vanish after start-up: with bad_samples=skip every image sample is dropped at load time,
    so in some steps one rank has nothing to train on. It must still join the all-reduce, and the
    final report must count the skips of both ranks."""
    data = tmp_path / "data"
    make_shapes(data, seed=2, image_size=32, n_stage1=4, n_stage2=24, n_eval=2, text_only_frac=0.25)
    records = json.loads((data / "stage2.json").read_text())
    # rank 1 gets the second half of each global batch: make those (and only those) image samples
    for r in records:
        if "image" in r:
            r["image"] = "missing/" + r["image"]
    (data / "stage2.json").write_text(json.dumps(records))
    n_image = sum("image" in r for r in records)
    cfg = run_config(llama_tokenizer_dir, data, tmp_path / "run", stage=2, max_steps=6, global_batch_size=4,
                     micro_batch_size=1)
    cfg.data.bad_samples, cfg.data.check_images_at_start = "skip", False
    cfg_file = tmp_path / "run.yaml"
    save_config(cfg, cfg_file)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29611",
           "-m", "llava_sft.train", str(cfg_file)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=280)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    skipped = [json.loads(line) for line in (tmp_path / "run" / "skipped.jsonl").read_text().splitlines()]
    assert sum(report["rejected_or_skipped"].values()) == len(skipped) > 0
    # 6 steps x 4 samples = one epoch of the 24 samples: every image sample was tried once, on one rank or the other
    assert len(skipped) == n_image and len({s["id"] for s in skipped}) == n_image
