"""Exact resume: a run killed with SIGKILL and restarted with the same command continues bit-identically."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from data_prep.make_shapes import generate as make_shapes
from llava_sft.config import save_config
from llava_sft.train import checkpoint as ckpt
from llava_sft.train.trainer import train
from tests.tiny import run_config

pytestmark = pytest.mark.slow  # multi-process or full runs: `pytest -m 'not slow'` skips them

REPO = Path(__file__).resolve().parents[1]
STEPS, SAVE_EVERY = 12, 3


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    make_shapes(out, seed=3, image_size=32, n_stage1=64, n_stage2=64, n_eval=4, text_only_frac=0.25)
    return out


def config_file(tokenizer_dir, data_dir, tmp_path, stage: int, name: str) -> tuple[Path, Path]:
    out = tmp_path / name
    cfg = run_config(tokenizer_dir, data_dir, out, stage=stage, max_steps=STEPS, save_every=SAVE_EVERY,
                     keep_last=2, seed=11)
    if stage == 2:
        cfg.data.group_by_modality = True
    path = tmp_path / f"{name}.yaml"
    save_config(cfg, path)
    return path, out


def launch(config: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false")
    return subprocess.Popen([sys.executable, "-m", "llava_sft.train", str(config)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def logged_steps(run_dir: Path) -> int:
    try:
        return len((run_dir / "metrics.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def weights(run_dir: Path) -> dict:
    files = [run_dir / "projector.safetensors"] + sorted((run_dir / "llm").glob("*.safetensors"))
    return {f"{f.name}:{k}": v for f in files if f.is_file() for k, v in load_file(f).items()}


@pytest.mark.parametrize("stage", [1, 2])
def test_sigkill_then_restart_continues_exactly(llama_tokenizer_dir, shapes_dir, tmp_path, stage):
    ref_cfg, ref_dir = config_file(llama_tokenizer_dir, shapes_dir, tmp_path, stage, "reference")
    proc = launch(ref_cfg)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()

    cfg, run_dir = config_file(llama_tokenizer_dir, shapes_dir, tmp_path, stage, "killed")
    kill_after = random.Random(stage).randint(SAVE_EVERY + 1, 2 * SAVE_EVERY + 1)  # past >= 1 checkpoint
    proc = launch(cfg)
    deadline = time.time() + 300
    while logged_steps(run_dir) < kill_after and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (run_dir / "report.json").exists()
    saved = [int(p.name.split("_")[1]) for p in ckpt.list_checkpoints(run_dir / "checkpoints")]
    assert saved and max(saved) < STEPS

    proc = launch(cfg)  # the same command again
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{max(saved)}'}" in err

    got, want = rows(run_dir), rows(ref_dir)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))  # rows of the killed run past the checkpoint dropped
    for key in ("loss", "grad_norm", "lr", "supervised_tokens", "samples"):
        assert [r[key] for r in got] == [r[key] for r in want], key
    a, b = weights(run_dir), weights(ref_dir)
    assert a.keys() == b.keys() and a
    assert all((a[k] == b[k]).all() for k in a)


def test_resume_refuses_a_changed_data_order(llama_tokenizer_dir, shapes_dir, tmp_path):
    cfg = run_config(llama_tokenizer_dir, shapes_dir, tmp_path / "run", stage=1, max_steps=4, save_every=2, seed=1)
    train(cfg)
    (tmp_path / "run" / "report.json").unlink()  # pretend the run was interrupted after its checkpoints
    cfg.train.seed = 2
    with pytest.raises(ValueError, match=r"train\.seed was 1 and is now 2"):
        train(cfg)
    cfg.train.seed, cfg.data.group_by_length = 1, True
    with pytest.raises(ValueError, match=r"data\.group_by_length was False and is now True"):
        train(cfg)


def test_a_checkpoint_older_than_a_data_order_key_resumes_under_its_default(llama_tokenizer_dir, shapes_dir, tmp_path):
    """A checkpoint saved before data.group_by_length existed has no such key: that run had the default (False),
    so it resumes under False and is refused under True."""
    cfg = run_config(llama_tokenizer_dir, shapes_dir, tmp_path / "run", stage=1, max_steps=4, save_every=2, seed=1)
    train(cfg)
    (tmp_path / "run" / "report.json").unlink()
    for state_file in (tmp_path / "run").rglob("state.pt"):
        state = torch.load(state_file, weights_only=False)
        del state["config"]["data"]["group_by_length"]
        torch.save(state, state_file)
    cfg.data.group_by_length = True
    with pytest.raises(ValueError, match=r"data\.group_by_length was False and is now True"):
        train(cfg)
    cfg.data.group_by_length = False
    train(cfg)  # resumes instead of refusing (before the default was taken: "was None and is now False")


def test_finished_run_is_not_retrained_and_never_starts_over(llama_tokenizer_dir, shapes_dir, tmp_path):
    run_dir = tmp_path / "run"
    cfg = run_config(llama_tokenizer_dir, shapes_dir, run_dir, stage=1, max_steps=4, save_every=2)
    train(cfg)
    before = (run_dir / "metrics.jsonl").read_text()
    stamp = (run_dir / "projector.safetensors").stat().st_mtime_ns
    train(cfg)  # resume=auto on a finished run: nothing to do
    assert (run_dir / "projector.safetensors").stat().st_mtime_ns == stamp
    assert (run_dir / "metrics.jsonl").read_text() == before

    cfg.train.resume = "never"
    cfg.train.save_every = 0
    train(cfg)  # from scratch: old checkpoints removed, a fresh metrics file
    assert ckpt.list_checkpoints(run_dir / "checkpoints") == []
    assert [r["step"] for r in rows(run_dir)] == [1, 2, 3, 4]


def test_resume_from_an_explicit_checkpoint(llama_tokenizer_dir, shapes_dir, tmp_path):
    first = tmp_path / "first"
    cfg = run_config(llama_tokenizer_dir, shapes_dir, first, stage=1, max_steps=6, save_every=2, keep_last=3)
    train(cfg)
    other = run_config(llama_tokenizer_dir, shapes_dir, tmp_path / "second", stage=1, max_steps=6,
                       resume=str(first / "checkpoints" / "step_2"))
    train(other)
    assert [r["step"] for r in rows(tmp_path / "second")] == [3, 4, 5, 6]
    assert [r["loss"] for r in rows(tmp_path / "second")] == [r["loss"] for r in rows(first)][2:]
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        train(run_config(llama_tokenizer_dir, shapes_dir, tmp_path / "third", stage=1, resume=str(tmp_path / "nope")))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signal_saves_a_checkpoint_exits_75_and_resumes_exactly(llama_tokenizer_dir, shapes_dir, tmp_path,
                                                                            sig):
    """What SLURM / Kubernetes send before killing a job: the run finishes its step, every rank writes the
    checkpoint, the process exits 75; the same command continues exactly (save_every off: the notice alone saves)."""
    ref_cfg, ref_dir = config_file(llama_tokenizer_dir, shapes_dir, tmp_path, 2, "reference")
    assert launch(ref_cfg).wait(timeout=300) == 0

    out = tmp_path / "preempted"
    cfg = run_config(llama_tokenizer_dir, shapes_dir, out, stage=2, max_steps=STEPS, save_every=0, keep_last=2,
                     seed=11)
    cfg.data.group_by_modality = True
    path = tmp_path / "preempted.yaml"
    save_config(cfg, path)
    proc = launch(path)
    deadline = time.time() + 300
    while logged_steps(out) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    saved = [int(p.name.split("_")[1]) for p in ckpt.list_checkpoints(out / "checkpoints")]
    assert len(saved) == 1 and 3 <= saved[0] < STEPS and f"{sig.name} received: stopped after step {saved[0]}" in err
    assert not (out / "report.json").exists()

    proc = launch(path)  # the same command again
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    got, want = rows(out), rows(ref_dir)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in got] == [r["loss"] for r in want]


def test_checkpoints_by_minutes_are_on_by_default(llama_tokenizer_dir, shapes_dir, tmp_path):
    from llava_sft.config import TrainConfig

    assert TrainConfig().save_every_minutes == 30.0  # a job killed without notice loses at most 30 minutes
    cfg = run_config(llama_tokenizer_dir, shapes_dir, tmp_path / "run", stage=1, max_steps=3, save_every=0,
                     save_every_minutes=1e-9, keep_last=5)  # due after every step
    train(cfg)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step_1", "step_2"]


def test_resume_refuses_data_whose_contents_changed_under_the_same_name(llama_tokenizer_dir, shapes_dir, tmp_path):
    """Issue: resume compared the data file's name and the steps per epoch, not its contents."""
    data = tmp_path / "data"
    data.mkdir()
    records = json.loads((shapes_dir / "stage1.json").read_text())
    (data / "stage1.json").write_text(json.dumps(records))
    cfg = run_config(llama_tokenizer_dir, shapes_dir, tmp_path / "run", stage=1, max_steps=4, save_every=2)
    cfg.data.path = str(data / "stage1.json")
    train(cfg)
    (tmp_path / "run" / "report.json").unlink()  # as if interrupted after its checkpoints
    records[0]["conversations"][1]["value"] = "A different caption."  # same name, same count, other samples
    (data / "stage1.json").write_text(json.dumps(records))
    with pytest.raises(ValueError, match=r"the data's contents changed since the checkpoint"):
        train(cfg)
