"""The training core: freezing, token-normalised accumulation, config validation, real short runs."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from data_prep.make_shapes import generate as make_shapes
from llava_sft.config import ConfigError, RunConfig, from_dict, load_config
from llava_sft.data.dataset import Collator
from llava_sft.train import checkpoint as ckpt
from llava_sft.train.trainer import (
    DDPEngine,
    accumulate_gradients,
    build,
    param_groups,
    seed_everything,
    train,
    train_step,
)
from tests.tiny import run_config


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    make_shapes(out, seed=0, image_size=32, n_stage1=96, n_stage2=96, n_eval=10, text_only_frac=0.2)
    return out


def batches_of(dataset, indices, micro):
    collate = Collator(dataset.tokenizer.pad_token_id)
    return [collate([dataset[i] for i in indices[j:j + micro]]) for j in range(0, len(indices), micro)]


def test_stage1_steps_change_only_the_projector(llama_tokenizer_dir, shapes_dir, tmp_path):
    cfg = run_config(llama_tokenizer_dir, shapes_dir, tmp_path, stage=1, weight_decay=0.1)
    seed_everything(0)
    model, _, dataset = build(cfg, torch.device("cpu"))
    report = model.set_trainable(cfg.train.train_projector, cfg.train.train_llm)
    assert report["vision_tower"][0] == 0 and report["llm"][0] == 0 and report["projector"][0] == report["projector"][1] > 0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(param_groups(model, 0.1, 1e-2), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    for step in range(3):
        train_step(DDPEngine.local(model, opt, sched, cfg.train), batches_of(dataset, list(range(step * 8, step * 8 + 8)), 4),
                   torch.device("cpu"), False, dataset.report)
    after = model.state_dict()
    for name, value in before.items():
        if name.startswith("projector."):
            assert not torch.equal(value, after[name]), f"{name} did not train"
        else:
            assert torch.equal(value, after[name]), f"frozen {name} changed"


@pytest.mark.parametrize("stage", [1, 2])
def test_accumulation_equals_one_big_batch(llama_tokenizer_dir, shapes_dir, tmp_path, stage):
    """k micro-batches of different lengths give the gradient of one k-times-larger batch."""
    cfg = run_config(llama_tokenizer_dir, shapes_dir, tmp_path, stage=stage)
    seed_everything(0)
    model, _, dataset = build(cfg, torch.device("cpu"))
    model.set_trainable(True, stage == 2)
    indices = list(range(8))

    def grads(micro):
        model.zero_grad(set_to_none=True)
        row = accumulate_gradients(DDPEngine.local(model), batches_of(dataset, indices, micro), torch.device("cpu"), False)
        return row["loss"], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_big, g_big = grads(8)
    for micro in (4, 2, 1):
        loss, g = grads(micro)
        assert loss == pytest.approx(loss_big, rel=1e-5)
        assert g.keys() == g_big.keys()
        for name in g:
            assert torch.allclose(g[name], g_big[name], rtol=1e-4, atol=1e-7), (micro, name)
    # the normaliser is the token count of the whole batch: the loss is the mean over supervised tokens
    batch = batches_of(dataset, indices, 8)[0]
    with torch.no_grad():
        loss_sum, n = model(batch["input_ids"], batch["attention_mask"], batch["images"], batch["labels"])
    assert loss_big == pytest.approx((loss_sum / n).item(), rel=1e-5)


def test_config_validation_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.lrr' \(did you mean 'train\.lr'\?\)"):
        from_dict(RunConfig, {"train": {"lrr": 1e-3}})
    with pytest.raises(ConfigError, match=r"train\.micro_batch_size: expected int, got 'four'"):
        load_config(None, ["train.micro_batch_size=four"])
    with pytest.raises(ConfigError, match=r"model\.vision\.select_layer: expected int"):
        from_dict(RunConfig, {"model": {"vision": {"select_layer": 1.5}}})
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.lr"])
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("train:\n  lr: 2e-5\n  epochs: 3\nmodel:\n  projector: linear\n")
    cfg = load_config(cfg_file, ["train.lr=1e-4", "data.template=vicuna_v1", "train.max_steps=null"])
    assert cfg.train.lr == 1e-4 and cfg.train.epochs == 3.0 and cfg.model.projector == "linear"
    assert cfg.data.template == "vicuna_v1" and cfg.train.max_steps is None
    cfg_file.write_text("trian:\n  lr: 1\n")
    result = subprocess.run([sys.executable, "-m", "llava_sft.train", str(cfg_file)], capture_output=True, text=True)
    assert result.returncode == 2 and "unknown config key 'trian'" in result.stderr


def test_unknown_template_fails_before_training(llama_tokenizer_dir, shapes_dir, tmp_path):
    cfg = run_config(llama_tokenizer_dir, shapes_dir, tmp_path, stage=1)
    cfg.data.template = "vicuna_v9"
    with pytest.raises(KeyError, match="unknown chat template 'vicuna_v9'"):
        build(cfg, torch.device("cpu"))


def test_stage1_then_stage2_real_runs(llama_tokenizer_dir, shapes_dir, tmp_path):
    """Both stages through the one core: loss falls, logs and checkpoints exist, the model generates."""
    s1 = run_config(llama_tokenizer_dir, shapes_dir, tmp_path / "stage1", stage=1, max_steps=6, save_every=2, keep_last=2)
    train(s1)
    out1 = tmp_path / "stage1"
    assert (out1 / "projector.safetensors").is_file() and (out1 / "llava_config.json").is_file()
    assert not (out1 / "llm").exists()  # Stage 1 saves the projector only
    assert [p.name for p in ckpt.list_checkpoints(out1 / "checkpoints")] == ["step_2", "step_4"]
    state, rank0 = ckpt.load_checkpoint(out1 / "checkpoints" / "step_4")
    assert state["step"] == 4 and set(state["trainable"]) == {n for n in state["trainable"] if n.startswith("projector.")}
    assert {"optimizer", "scheduler", "data_position", "config"} <= set(state) and "rng" in rank0
    assert load_config(out1 / "config.yaml").train.max_steps == 6  # the resolved config is saved

    s2 = run_config(llama_tokenizer_dir, shapes_dir, tmp_path / "stage2", stage=2, max_steps=30, lr=3e-3,
                    pretrained_projector=str(out1))
    train(s2)
    out2 = tmp_path / "stage2"
    rows = [json.loads(line) for line in (out2 / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 30
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s", "data_s", "compute_s"):
        assert key in rows[0]
    first, last = sum(r["loss"] for r in rows[:3]) / 3, sum(r["loss"] for r in rows[-3:]) / 3
    assert last < 0.7 * first, (first, last)  # a clear fall, not noise
    assert (out2 / "loss.png").stat().st_size > 1000
    report = json.loads((out2 / "report.json").read_text())
    assert report["steps"] == 30 and report["rejected_or_skipped"] == {}

    image = sorted((shapes_dir / "images").iterdir())[-1]
    result = subprocess.run([sys.executable, "-m", "llava_sft.generate", "--model", str(out2), "--image", str(image),
                             "--prompt", "How many shapes are there?", "--max-new-tokens", "4"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1].strip() != ""


def test_training_the_llm_without_saving_it_is_said_loudly(llama_tokenizer_dir, shapes_dir, tmp_path):
    """train.save_full_model defaults to false (right for Stage 1): a Stage-2 config that forgets it trains the LLM
    for hours and saves the projector only. The run says so at the start, in its log."""
    cfg = run_config(llama_tokenizer_dir, shapes_dir, tmp_path / "s2", stage=2, max_steps=1, save_full_model=False)
    train(cfg)
    log_text = (tmp_path / "s2" / "train.log").read_text()
    assert "train.train_llm=true but train.save_full_model=false" in log_text
    assert not (tmp_path / "s2" / "llm").exists()  # what the warning says: the LLM was not saved
    saved = run_config(llama_tokenizer_dir, shapes_dir, tmp_path / "full", stage=2, max_steps=1)
    train(saved)
    assert "save_full_model=false" not in (tmp_path / "full" / "train.log").read_text()


def test_gradient_checkpointing_with_a_frozen_llm_gives_the_same_gradients(llama_tokenizer_dir, shapes_dir, tmp_path):
    cfg = run_config(llama_tokenizer_dir, shapes_dir, tmp_path, stage=1)
    seed_everything(0)
    model, _, dataset = build(cfg, torch.device("cpu"))
    model.set_trainable(True, False)
    model.train()
    batches = batches_of(dataset, list(range(4)), 4)

    def projector_grads():
        model.zero_grad(set_to_none=True)
        accumulate_gradients(DDPEngine.local(model), batches, torch.device("cpu"), False)
        return [p.grad.clone() for p in model.projector.parameters()]

    plain = projector_grads()
    model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = projector_grads()
    assert all(g.abs().sum() > 0 for g in checkpointed)
    for a, b in zip(plain, checkpointed, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
