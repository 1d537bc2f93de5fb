"""DeepSpeed ZeRO-2/3 (train.deepspeed) on two CPU processes (torchrun, gloo, DS_ACCELERATOR=cpu) trains
like one plain process with the same global batch, resumes exactly, and writes the usual output format.

Tolerance: per-step losses rel 1e-4 (measured: ~2e-7; the ranks' gradients are summed in another order, in
float32). A resumed DeepSpeed run continues bit-identically (same number of ranks).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from data_prep.make_shapes import generate as make_shapes
from llava_sft.config import save_config
from llava_sft.model.llava import LlavaModel
from llava_sft.train.engines.deepspeed import DeepSpeedConfigError
from llava_sft.train.trainer import train
from tests.tiny import forward_passes, run_config

pytestmark = pytest.mark.slow  # multi-process or full runs: `pytest -m 'not slow'` skips them

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "configs" / "deepspeed"
REL = 1e-4


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes_ds")
    make_shapes(out, seed=5, image_size=32, n_stage1=16, n_stage2=32, n_eval=2, text_only_frac=0.25)
    return out


def ds_json(tmp_path: Path, name: str, **changes) -> Path:
    """A shipped config, as is apart from `changes` (bf16 "auto" is off on a CPU anyway)."""
    cfg = json.loads((SHIPPED / name).read_text())
    for key, value in changes.items():
        cfg[key] = value
    path = tmp_path / f"ds_{len(list(tmp_path.glob('ds_*')))}_{name}"
    path.write_text(json.dumps(cfg))
    return path


def torchrun(cfg, tmp_path: Path, name: str, port: int) -> subprocess.CompletedProcess:
    cfg_file = tmp_path / f"{name}.yaml"
    save_config(cfg, cfg_file)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", DS_ACCELERATOR="cpu",
               PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "llava_sft.train", str(cfg_file)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400, cwd=REPO)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def stage2_from_pretrained(tokenizer_dir, data, tmp_path: Path, name: str, **train_kw):
    """A 4-step Stage-2 config starting from a saved LLM directory and a Stage-1 projector, so that a plain and a
    ZeRO-3 run start from the same weights (under ZeRO-3 from_pretrained loads the LLM partitioned; an LLM
    built from a config would be initialised partition-wise, with other random numbers)."""
    if not (tmp_path / "llm").is_dir():
        from llava_sft.train.trainer import build

        torch.manual_seed(0)
        base = run_config(tokenizer_dir, data, tmp_path / "base", stage=2)
        base.data.bad_samples, base.data.check_images_at_start = "skip", False
        model, _, _ = build(base, torch.device("cpu"))
        model.llm.save_pretrained(tmp_path / "llm")
        model.save_projector(tmp_path / "stage1")
    cfg = run_config(tokenizer_dir, data, tmp_path / name, stage=2, max_steps=4,
                     pretrained_projector=str(tmp_path / "stage1"), **train_kw)
    cfg.model.llm.config, cfg.model.llm.path = None, str(tmp_path / "llm")
    return cfg


def test_bad_deepspeed_configs_fail_before_training(llama_tokenizer_dir, shapes, tmp_path):
    cfg = run_config(llama_tokenizer_dir, shapes, tmp_path / "run", stage=1, grad_clip=1.0)
    cases = [
        (ds_json(tmp_path, "zero2.json", optimizer={"type": "AdamW", "params": {"lr": 1e-3}}), "'optimizer' section"),
        (ds_json(tmp_path, "zero3_offload.json", scheduler={"type": "WarmupLR"}), "'scheduler' section"),
        (ds_json(tmp_path, "zero2.json", gradient_clipping=0.0), r"gradient_clipping=0\.0 .*train\.grad_clip"),
        (ds_json(tmp_path, "zero2.json", train_batch_size=64), r"train_batch_size=64 .*train\.global_batch_size"),
    ]
    for path, message in cases:
        cfg.train.deepspeed = str(path)
        with pytest.raises(DeepSpeedConfigError, match=message):
            train(cfg)
        assert not (tmp_path / "run" / "metrics.jsonl").exists()  # stopped before anything ran


def test_a_trained_vision_tower_is_refused_under_zero3(llama_tokenizer_dir, shapes, tmp_path):
    """ZeRO-3 keeps the tower whole as buffers (train.train_vision_tower would train nothing there): refused
    when the engine is made, before any model loads; ZeRO-2 takes it."""
    from llava_sft.train.engines.deepspeed import DeepSpeedEngine

    cfg = run_config(llama_tokenizer_dir, shapes, tmp_path / "run", stage=2, train_vision_tower=True,
                     deepspeed=str(ds_json(tmp_path, "zero3.json")))
    with pytest.raises(DeepSpeedConfigError, match="train_vision_tower=true needs ZeRO-2"):
        DeepSpeedEngine(cfg, world=1, rank=0)
    cfg.train.deepspeed = str(ds_json(tmp_path, "zero2.json"))
    assert DeepSpeedEngine(cfg, world=1, rank=0).stage == 2


@pytest.mark.latest_stack
@pytest.mark.timeout(420)
def test_stage1_zero2_matches_one_process_and_resumes_exactly(llama_tokenizer_dir, shapes, tmp_path):
    plain = run_config(llama_tokenizer_dir, shapes, tmp_path / "plain", stage=1, max_steps=4,
                       global_batch_size=8, micro_batch_size=2)
    train(plain)
    zero = run_config(llama_tokenizer_dir, shapes, tmp_path / "zero2", stage=1, max_steps=4, global_batch_size=8,
                      micro_batch_size=2, save_every=2, deepspeed=str(ds_json(tmp_path, "zero2.json")))
    torchrun(zero, tmp_path, "zero2", 29721)
    want, got = rows(tmp_path / "plain"), rows(tmp_path / "zero2")
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], rel=REL)
    assert [r["grad_norm"] for r in got] == pytest.approx([r["grad_norm"] for r in want], rel=1e-3)
    assert [r["lr"] for r in got] == pytest.approx([r["lr"] for r in want], rel=1e-9)
    a, b = load_file(tmp_path / "zero2" / "projector.safetensors"), load_file(tmp_path / "plain" / "projector.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5)
    assert json.loads((tmp_path / "zero2" / "llava_config.json").read_text())["dims"] == \
        json.loads((tmp_path / "plain" / "llava_config.json").read_text())["dims"]
    step2 = tmp_path / "zero2" / "checkpoints" / "step_2"
    assert (step2 / "DONE").is_file() and (step2 / "deepspeed").is_dir()

    # exact resume from the engine's checkpoint, in another run directory
    resumed = run_config(llama_tokenizer_dir, shapes, tmp_path / "resumed", stage=1, max_steps=4, global_batch_size=8,
                         micro_batch_size=2, resume=str(step2), deepspeed=str(ds_json(tmp_path, "zero2.json")))
    result = torchrun(resumed, tmp_path, "resumed", 29722)
    assert f"resumed from {step2}" in result.stderr
    again = rows(tmp_path / "resumed")
    assert [r["step"] for r in again] == [3, 4]
    for key in ("loss", "grad_norm", "lr"):
        assert [r[key] for r in again] == [r[key] for r in got][2:], key
    c = load_file(tmp_path / "resumed" / "projector.safetensors")
    assert all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.latest_stack
@pytest.mark.timeout(420)
def test_stage2_zero3_matches_one_process_and_saves_a_loadable_model(llama_tokenizer_dir, shapes, tmp_path):
    def config(name, **kw):
        cfg = stage2_from_pretrained(llama_tokenizer_dir, shapes, tmp_path, name, global_batch_size=8,
                                     micro_batch_size=2, **kw)
        cfg.data.group_by_modality = True
        return cfg

    train(config("plain"))
    zero3 = str(ds_json(tmp_path, "zero3.json"))
    torchrun(config("zero3", deepspeed=zero3, save_every=2), tmp_path, "zero3", 29731)
    want, got = rows(tmp_path / "plain"), rows(tmp_path / "zero3")
    assert len(got) == 4 and got[-1]["loss"] < got[0]["loss"]
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], rel=REL)
    assert [r["grad_norm"] for r in got] == pytest.approx([r["grad_norm"] for r in want], rel=1e-3)
    log = (tmp_path / "zero3" / "train.log").read_text()
    assert "DeepSpeed ZeRO-3" in log and "ZeRO-3: 21 of 21 LLM parameter tensors were loaded partitioned" in log

    # exact resume of a ZeRO-3 run (partitioned fp32 masters, optimizer and schedule from the engine's files)
    step2 = tmp_path / "zero3" / "checkpoints" / "step_2"
    result = torchrun(config("resumed", deepspeed=zero3, resume=str(step2)), tmp_path, "resumed", 29732)
    assert f"resumed from {step2}" in result.stderr
    again = rows(tmp_path / "resumed")
    assert [r["step"] for r in again] == [3, 4]
    for key in ("loss", "grad_norm", "lr"):
        assert [r[key] for r in again] == [r[key] for r in got][2:], key
    a, b = LlavaModel.from_pretrained(tmp_path / "zero3")[0], LlavaModel.from_pretrained(tmp_path / "resumed")[0]
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))

    # the consolidated output is the single-process format: same files, same tensors (approximately)
    out, ref = tmp_path / "zero3", tmp_path / "plain"
    for name in ("projector.safetensors", "vision_tower.safetensors"):
        a, b = load_file(out / name), load_file(ref / name)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)
    a, b = LlavaModel.from_pretrained(out)[0].state_dict(), LlavaModel.from_pretrained(ref)[0].state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)

    from llava_sft.generate import Answerer

    answer = Answerer(out, device="cpu").answer(["What is the color of the circle?"],
                                                [Image.new("RGB", (32, 32), (200, 30, 30))], max_new_tokens=4)
    assert isinstance(answer[0], str)


@pytest.mark.timeout(300)
def test_zero3_rank_whose_samples_are_all_skipped_does_not_hang(llama_tokenizer_dir, shapes, tmp_path):
    """Every image vanishes after start-up (bad_samples=skip): some micro-batches of a rank hold nothing. Under
    ZeRO-3 each forward gathers parameters collectively, so that rank runs a no-op batch instead; the losses are
    still those of one plain process, and both ranks' skips reach the report."""
    data = tmp_path / "data"
    shutil.copytree(shapes, data)
    records = json.loads((data / "stage2.json").read_text())
    for r in records:
        if "image" in r:
            r["image"] = "missing/" + r["image"]
    (data / "stage2.json").write_text(json.dumps(records))

    def config(name, **kw):
        cfg = stage2_from_pretrained(llama_tokenizer_dir, data, tmp_path, name, global_batch_size=4,
                                     micro_batch_size=1, **kw)
        cfg.data.bad_samples, cfg.data.check_images_at_start = "skip", False
        return cfg

    train(config("plain"))
    torchrun(config("zero3", deepspeed=str(ds_json(tmp_path, "zero3.json"))), tmp_path, "zero3", 29741)
    got, want = rows(tmp_path / "zero3"), rows(tmp_path / "plain")
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], rel=REL)
    a = json.loads((tmp_path / "zero3" / "report.json").read_text())
    b = json.loads((tmp_path / "plain" / "report.json").read_text())
    assert a["rejected_or_skipped"] == b["rejected_or_skipped"] and sum(a["rejected_or_skipped"].values()) > 0


@pytest.mark.timeout(420)
def test_zero3_with_packing_matches_one_unpacked_process(llama_tokenizer_dir, shapes, tmp_path):
    """Packing (data.packing) gives the ranks different numbers of forward passes in a step. Under ZeRO-3 every
    forward gathers parameters collectively, so the rank with fewer runs no-op batches up to the other's count;
    the losses are those of one plain unpacked process with the same global batch."""
    def config(name, packing, **kw):
        cfg = stage2_from_pretrained(llama_tokenizer_dir, shapes, tmp_path, name, global_batch_size=8,
                                     micro_batch_size=1 if packing else 2, **kw)
        cfg.data.packing, cfg.data.pack_max_tokens = packing, 150
        return cfg

    assert any(len(set(per_rank)) > 1 for per_rank in forward_passes(config("probe", True), 2, 4))
    train(config("plain", False))
    torchrun(config("zero3", True, deepspeed=str(ds_json(tmp_path, "zero3.json"))), tmp_path, "zero3", 29751)
    got, want = rows(tmp_path / "zero3"), rows(tmp_path / "plain")
    assert len(got) == 4 and [r["samples"] for r in got] == [8] * 4
    assert [r["supervised_tokens"] for r in got] == [r["supervised_tokens"] for r in want]
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], rel=REL)


@pytest.mark.timeout(420)
def test_zero3_image_and_text_only_micro_batches_side_by_side(llama_tokenizer_dir, shapes, tmp_path):
    """Without modality grouping one rank may run a text-only micro-batch while the other runs images. ZeRO-3
    gathers parameters in module hooks, collectively: both must call the same modules in the same order (a
    text-only batch runs the tower on a blank image), or the ranks hang. Losses: those of one plain process."""
    from llava_sft.train.trainer import build, make_plan

    def config(name, **kw):
        return stage2_from_pretrained(llama_tokenizer_dir, shapes, tmp_path, name, global_batch_size=8,
                                      micro_batch_size=1, **kw)

    _, _, dataset = build(config("probe"), torch.device("cpu"))
    plans = [make_plan(config("probe"), dataset, 2, rank) for rank in range(2)]
    modalities = [[[dataset.has_image(i) for mb in p.micro_batches(gb) for i in mb] for gb in p.global_batches(0)]
                  for p in plans]
    assert any(a != b for a, b in zip(*modalities, strict=True))  # the situation under test occurs
    train(config("plain"))
    torchrun(config("zero3", deepspeed=str(ds_json(tmp_path, "zero3.json"))), tmp_path, "zero3", 29761)
    got, want = rows(tmp_path / "zero3"), rows(tmp_path / "plain")
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], rel=REL)
