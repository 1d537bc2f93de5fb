"""One live run per train.output_dir (issue: two runs on one directory both exited 0, every metrics row twice and the
models overwriting each other): the second refuses at once through the CLI; a dead process's lock is taken over."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_prep.make_shapes import generate as make_shapes
from llava_sft.config import save_config
from llava_sft.train.rundir import LOCK_FILE, RunDirLocked
from llava_sft.train.trainer import train
from tests.tiny import run_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes_lock")
    make_shapes(out, seed=6, image_size=32, n_stage1=16, n_stage2=4, n_eval=2, text_only_frac=0.0)
    return out


def launch(config: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false")
    return subprocess.Popen([sys.executable, "-m", "llava_sft.train", str(config)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_a_second_live_run_on_the_same_output_dir_refuses_at_once(llama_tokenizer_dir, shapes_dir, tmp_path):
    out = tmp_path / "run"
    cfg = run_config(llama_tokenizer_dir, shapes_dir, out, stage=1, max_steps=100000, global_batch_size=4,
                     micro_batch_size=4)
    path = tmp_path / "run.yaml"
    save_config(cfg, path)
    first = launch(path)
    try:
        deadline = time.time() + 120
        while not (out / "metrics.jsonl").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, first.stderr.read()[-2000:]
        second = launch(path)
        _, err = second.communicate(timeout=120)
        assert second.returncode == 2, err[-2000:]
        assert f"another run is using {out}" in err and f"PID {first.pid}" in err
        assert "Traceback" not in err  # one line, not a stack
    finally:
        first.send_signal(signal.SIGTERM)  # pre-emption path: checkpoint, exit 75, lock released
        first.communicate(timeout=120)
    assert first.returncode == 75 and not (out / LOCK_FILE).exists()


def test_a_dead_processs_lock_is_taken_over_and_another_hosts_is_not(llama_tokenizer_dir, shapes_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()  # its PID now names no process
    (out / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": "earlier"}))
    cfg = run_config(llama_tokenizer_dir, shapes_dir, out, stage=1, max_steps=1)
    train(cfg)
    assert (out / "report.json").is_file() and not (out / LOCK_FILE).exists()
    assert "training on cpu (train.device=auto), world size 1" in (out / "train.log").read_text()  # logged at start

    other = tmp_path / "other"
    other.mkdir()
    (other / LOCK_FILE).write_text(json.dumps({"host": "node-17", "pid": 1234, "started": "earlier"}))
    with pytest.raises(RunDirLocked, match=rf"node-17 PID 1234.*delete {other / LOCK_FILE}"):
        train(run_config(llama_tokenizer_dir, shapes_dir, other, stage=1, max_steps=1))
    assert not (other / "metrics.jsonl").exists()


def test_an_unwritable_output_dir_is_one_clear_error(llama_tokenizer_dir, shapes_dir, tmp_path):
    (tmp_path / "a-file").write_text("not a directory")
    with pytest.raises(RunDirLocked, match=r"cannot write .*a-file/run/RUN\.lock .*writable directory"):
        train(run_config(llama_tokenizer_dir, shapes_dir, tmp_path / "a-file" / "run", stage=1, max_steps=1))
