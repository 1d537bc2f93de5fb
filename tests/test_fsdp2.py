"""FSDP2 (train.engine=fsdp2: torch's fully_shard per decoder layer) on two CPU processes (torchrun, gloo) trains
like one plain process with the same global batch, resumes exactly after SIGKILL, and writes the usual output
format. Every run starts from an LLM saved to a directory, as the recipes do.

Tolerance: per-step losses rel 1e-4, as for DeepSpeed (tests/test_deepspeed.py): the ranks' gradients are
reduce-scattered -- summed in another order -- in float32, whose unit roundoff is 6e-8; over 4 steps of AdamW at
lr 1e-3 the measured difference is ~1e-6 relative. A resumed run continues bit-identically (same number of ranks).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from data_prep.make_shapes import generate as make_shapes
from llava_sft.config import ConfigError, save_config
from llava_sft.model.llava import LlavaModel
from llava_sft.train import checkpoint as ckpt
from llava_sft.train.trainer import build, train
from tests.tiny import run_config

pytestmark = pytest.mark.slow  # multi-process or full runs: `pytest -m 'not slow'` skips them

REPO = Path(__file__).resolve().parents[1]
REL = 1e-4


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes_fsdp")
    make_shapes(out, seed=5, image_size=32, n_stage1=24, n_stage2=32, n_eval=2, text_only_frac=0.25)
    return out


def from_directory(tokenizer_dir, data, tmp_path: Path, name: str, stage: int, **train_kw):
    """A config whose LLM is loaded from a saved directory (and, in Stage 2, a saved Stage-1 projector)."""
    if not (tmp_path / "llm").is_dir():
        torch.manual_seed(0)
        base = run_config(tokenizer_dir, data, tmp_path / "base", stage=2)
        base.data.bad_samples, base.data.check_images_at_start = "skip", "off"
        model, _, _ = build(base, torch.device("cpu"))
        model.llm.save_pretrained(tmp_path / "llm")
        model.save_projector(tmp_path / "stage1")
    if stage == 2:
        train_kw.setdefault("pretrained_projector", str(tmp_path / "stage1"))
    cfg = run_config(tokenizer_dir, data, tmp_path / name, stage=stage, **train_kw)
    cfg.model.llm.config, cfg.model.llm.path = None, str(tmp_path / "llm")
    return cfg


def command(cfg, tmp_path: Path, name: str, port: int) -> tuple[list[str], dict]:
    cfg_file = tmp_path / f"{name}.yaml"
    save_config(cfg, cfg_file)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
            "-m", "llava_sft.train", str(cfg_file)], env


def torchrun(cfg, tmp_path: Path, name: str, port: int) -> subprocess.CompletedProcess:
    cmd, env = command(cfg, tmp_path, name, port)
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240, cwd=REPO)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_fsdp2_settings_that_cannot_work_are_refused_when_the_config_loads(llama_tokenizer_dir, shapes, tmp_path):
    from llava_sft.config import validate

    cfg = run_config(llama_tokenizer_dir, shapes, tmp_path / "run", stage=1, engine="fsdp2",
                     deepspeed="configs/deepspeed/zero2.json")
    with pytest.raises(ConfigError, match=r"train\.engine=fsdp2 but train\.deepspeed="):
        validate(cfg)
    cfg = run_config(llama_tokenizer_dir, shapes, tmp_path / "run", stage=1, fsdp_shard_size=2)
    with pytest.raises(ConfigError, match=r"fsdp_shard_size=2 applies to train\.engine=fsdp2 only"):
        validate(cfg)
    cfg = run_config(llama_tokenizer_dir, shapes, tmp_path / "run", stage=1, engine="deepspeed")
    with pytest.raises(ConfigError, match=r"train\.engine=deepspeed needs train\.deepspeed"):
        validate(cfg)


@pytest.mark.timeout(420)
def test_stage1_fsdp2_matches_one_process_and_resumes_after_sigkill(llama_tokenizer_dir, shapes, tmp_path):
    def config(name, **kw):
        return from_directory(llama_tokenizer_dir, shapes, tmp_path, name, 1, max_steps=6, global_batch_size=8,
                              micro_batch_size=2, **kw)

    train(config("plain"))
    torchrun(config("fsdp2", engine="fsdp2"), tmp_path, "fsdp2", 29821)
    want, got = rows(tmp_path / "plain"), rows(tmp_path / "fsdp2")
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], rel=REL)
    assert [r["grad_norm"] for r in got] == pytest.approx([r["grad_norm"] for r in want], rel=1e-3)
    assert [r["lr"] for r in got] == pytest.approx([r["lr"] for r in want], rel=1e-9)
    a, b = load_file(tmp_path / "fsdp2" / "projector.safetensors"), load_file(tmp_path / "plain" / "projector.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5)
    assert "FSDP2: 2 decoder layers + the rest sharded" in (tmp_path / "fsdp2" / "train.log").read_text()

    # SIGKILL the whole job after its first checkpoint; the same command then continues bit-identically
    killed = config("killed", engine="fsdp2", save_every=2)
    cmd, env = command(killed, tmp_path, "killed", 29822)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, run_dir = time.time() + 300, tmp_path / "killed"
    while not ckpt.list_checkpoints(run_dir / "checkpoints") and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    for child in psutil.Process(proc.pid).children(recursive=True):  # torchrun's workers, then torchrun
        child.send_signal(signal.SIGKILL)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    saved = ckpt.list_checkpoints(run_dir / "checkpoints")
    assert saved and not (run_dir / "report.json").exists() and (saved[-1] / "fsdp2").is_dir()
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400, cwd=REPO)
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"resumed from {saved[-1]}" in result.stderr
    again, uninterrupted = rows(run_dir), rows(tmp_path / "fsdp2")
    assert [r["step"] for r in again] == list(range(1, 7))
    for key in ("loss", "grad_norm", "lr"):
        assert [r[key] for r in again] == [r[key] for r in uninterrupted], key
    c = load_file(run_dir / "projector.safetensors")
    assert all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.latest_stack
@pytest.mark.timeout(420)
def test_stage2_fsdp2_with_packing_matches_one_process_and_saves_a_loadable_model(llama_tokenizer_dir, shapes,
                                                                                  tmp_path):
    """Stage 2 (the LLM trains) with packing, so the ranks run different numbers of forward passes per step (every
    FSDP2 layer all-gathers in forward: the rank with fewer runs no-op batches) and text-only micro-batches beside
    image ones. The saved model is the usual directory, in the dtype the LLM was loaded in."""
    def config(name, packing, **kw):
        cfg = from_directory(llama_tokenizer_dir, shapes, tmp_path, name, 2, max_steps=4, global_batch_size=8,
                             micro_batch_size=1 if packing else 2, gradient_checkpointing=True, **kw)
        cfg.data.packing, cfg.data.pack_max_tokens = packing, 150
        return cfg

    train(config("plain", False))
    torchrun(config("fsdp2", True, engine="fsdp2"), tmp_path, "fsdp2", 29831)
    got, want = rows(tmp_path / "fsdp2"), rows(tmp_path / "plain")
    assert len(got) == 4 and [r["samples"] for r in got] == [8] * 4
    assert [r["supervised_tokens"] for r in got] == [r["supervised_tokens"] for r in want]
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], rel=REL)
    assert [r["grad_norm"] for r in got] == pytest.approx([r["grad_norm"] for r in want], rel=1e-3)

    out, ref = tmp_path / "fsdp2", tmp_path / "plain"
    a, b = LlavaModel.from_pretrained(out)[0].state_dict(), LlavaModel.from_pretrained(ref)[0].state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)
    from PIL import Image

    from llava_sft.generate import Answerer

    answer = Answerer(out, device="cpu").answer(["What is the color of the circle?"],
                                                [Image.new("RGB", (32, 32), (200, 30, 30))], max_new_tokens=4)
    assert isinstance(answer[0], str)


@pytest.mark.timeout(420)
def test_stage2_lora_under_fsdp2_matches_one_process(llama_tokenizer_dir, shapes, tmp_path):
    """LoRA adapters inside sharded decoder layers (frozen base weights and trainable adapters in one FSDP2 group):
    the losses of one process, and the saved adapter loads and merges like a plain run's."""
    from llava_sft.merge_lora import merge_lora
    from llava_sft.model.lora import LoraSettings

    def config(name, **kw):
        cfg = from_directory(llama_tokenizer_dir, shapes, tmp_path, name, 2, max_steps=3, global_batch_size=8,
                             micro_batch_size=2, **kw)
        cfg.model.lora = LoraSettings(r=8, alpha=16, dropout=0.0)  # no dropout: the ranks' RNG streams differ
        cfg.data.group_by_modality = True
        return cfg

    train(config("plain"))
    torchrun(config("fsdp2", engine="fsdp2"), tmp_path, "fsdp2", 29841)
    got, want = rows(tmp_path / "fsdp2"), rows(tmp_path / "plain")
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], rel=REL)
    a = load_file(tmp_path / "fsdp2" / "llm" / "adapter_model.safetensors")
    b = load_file(tmp_path / "plain" / "llm" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5)
    merge_lora(tmp_path / "fsdp2", tmp_path / "merged")
    assert LlavaModel.from_pretrained(tmp_path / "merged")[0] is not None


@pytest.mark.timeout(300)
def test_compiled_decoder_layers_give_the_same_losses(llama_tokenizer_dir, shapes, tmp_path):
    """train.compile=true compiles each decoder layer with torch.compile (inductor's C++ kernels on a CPU). The
    kernels fuse and reorder float32 arithmetic (roundoff 6e-8 per operation over sums of ~100 terms), so losses
    agree to rel 1e-5, far inside what a real difference in the computation would move them."""
    def config(name, **kw):
        return from_directory(llama_tokenizer_dir, shapes, tmp_path, name, 2, max_steps=3, global_batch_size=8,
                              micro_batch_size=4, **kw)

    train(config("eager"))
    train(config("compiled", compile=True))
    got, want = rows(tmp_path / "compiled"), rows(tmp_path / "eager")
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], rel=1e-5)
    assert "compiled 2 decoder layers (train.compile)" in (tmp_path / "compiled" / "train.log").read_text()
