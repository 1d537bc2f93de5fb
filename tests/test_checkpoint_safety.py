"""Checkpoints survive what disks and nodes do (issue: a full disk gave torch's 'unexpected pos 650304 vs 650196' and
left a .tmp_step_N eating the space left; nothing was fsync'ed before the rename, and a truncated newest checkpoint
made resume=auto crash instead of falling back)."""
from __future__ import annotations

import json
import os
from collections import namedtuple

import pytest

from data_prep.make_shapes import generate as make_shapes
from llava_sft.train import checkpoint as ckpt
from llava_sft.train.trainer import train
from tests.tiny import run_config


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes_ckpt")
    make_shapes(out, seed=9, image_size=32, n_stage1=32, n_stage2=4, n_eval=2, text_only_frac=0.0)
    return out


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resume_auto_falls_back_when_the_newest_checkpoint_does_not_load(llama_tokenizer_dir, shapes_dir, tmp_path):
    run = tmp_path / "run"
    cfg = run_config(llama_tokenizer_dir, shapes_dir, run, stage=1, max_steps=6, save_every=1, keep_last=3)
    train(cfg)  # checkpoints at steps 3, 4, 5 are kept
    want = [r["loss"] for r in rows(run)]
    (run / "report.json").unlink()  # as if the job had died after step 5's checkpoint
    state = run / "checkpoints" / "step_5" / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # truncated, DONE still there
    train(cfg)
    log = (run / "train.log").read_text()
    assert "step_5/state.pt does not load" in log and "falling back to the previous checkpoint" in log
    assert f"resumed from {run / 'checkpoints' / 'step_4'}" in log
    assert [r["loss"] for r in rows(run)] == want  # steps 5 and 6 again, exactly


def test_a_full_disk_is_said_as_such_and_leaves_no_partial_checkpoint(llama_tokenizer_dir, shapes_dir, tmp_path,
                                                                       monkeypatch):
    run = tmp_path / "run"
    cfg = run_config(llama_tokenizer_dir, shapes_dir, run, stage=1, max_steps=4, save_every=1, keep_last=5)
    usage = namedtuple("usage", "total used free")
    calls = {"n": 0}

    def nearly_full(path):
        calls["n"] += 1
        return usage(10**9, 10**9 - 100, 100)  # 100 bytes free

    monkeypatch.setattr(ckpt.shutil, "disk_usage", nearly_full)
    with pytest.raises(OSError, match=r"checkpoint step_2 needs ~.* GiB .* has 0\.00 GiB free: free space"):
        train(cfg)  # step 1 is written (nothing to compare with), step 2 is refused before writing
    assert calls["n"] == 1
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_1"]


def test_a_write_error_removes_the_partial_checkpoint(llama_tokenizer_dir, shapes_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    cfg = run_config(llama_tokenizer_dir, shapes_dir, run, stage=1, max_steps=2, save_every=1)
    real_save = ckpt.torch.save

    def failing_save(obj, f, *a, **k):
        if str(f).endswith("state.pt"):
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(ckpt.torch, "save", failing_save)
    with pytest.raises(OSError, match=r"step_1 could not be written \(No space left on device\); the partial files "
                                      r"were removed"):
        train(cfg)
    assert os.listdir(run / "checkpoints") == []
