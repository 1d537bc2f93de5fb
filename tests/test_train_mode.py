"""The trainer on the recipes' path -- the LLM loaded from a directory (model.llm.path), as every paper recipe does:
training mode during the step (so gradient checkpointing and dropout really act), eval mode for generation,
16-bit trainable weights refused without fp32 masters, and the LR schedule exactly transformers'.

The measurements come from train/probe.py (LLAVA_SFT_PROBE), the instrument python -m llava_sft.preflight uses.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from data_prep.make_shapes import generate as make_shapes
from llava_sft.model.llava import LlavaModel
from llava_sft.model.lora import LoraSettings
from llava_sft.train.probe import ENV
from llava_sft.train.trainer import lr_lambda, train
from tests.tiny import run_config


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes_mode")
    make_shapes(out, seed=3, image_size=32, n_stage1=16, n_stage2=16, n_eval=2, text_only_frac=0.2)
    return out


@pytest.fixture(scope="module")
def llm_dir(llama_tokenizer_dir, shapes_dir, tmp_path_factory):
    """A tiny Llama saved with save_pretrained, so the runs load it as the recipes do (from_pretrained -> eval mode)."""
    from llava_sft.train.trainer import build

    out = tmp_path_factory.mktemp("llm_from_dir")
    torch.manual_seed(0)
    cfg = run_config(llama_tokenizer_dir, shapes_dir, out / "unused", stage=2)
    model, tokenizer, _ = build(cfg, torch.device("cpu"))
    model.llm.save_pretrained(out / "llm")
    tokenizer.save_pretrained(out / "llm")
    return out / "llm"


def path_config(tokenizer_dir, shapes_dir, llm_dir, out, **train_kw):
    cfg = run_config(tokenizer_dir, shapes_dir, out, stage=2, max_steps=2, **train_kw)
    cfg.model.llm.config, cfg.model.llm.path = None, str(llm_dir)
    return cfg


def probed_run(cfg, tmp_path, monkeypatch) -> dict:
    monkeypatch.setenv(ENV, str(tmp_path / "probe.json"))
    train(cfg)
    return json.loads((tmp_path / "probe.json.rank0").read_text())


def test_a_path_loaded_llm_trains_in_training_mode_and_checkpointing_saves_activations(
        llama_tokenizer_dir, shapes_dir, llm_dir, tmp_path, monkeypatch):
    """The bug: from_pretrained returns eval mode, transformers checkpoints only in training mode, so
    gradient_checkpointing: true saved exactly as many bytes as false. Measured, not read from the flag."""
    facts = probed_run(path_config(llama_tokenizer_dir, shapes_dir, llm_dir, tmp_path / "run",
                                   gradient_checkpointing=True), tmp_path, monkeypatch)
    assert facts["modes"]["llm_training"] is True and facts["modes"]["llm_modules_in_eval"] == 0
    assert facts["modes"]["vision_tower_training"] is False
    gc = facts["gradient_checkpointing"]
    # without checkpointing each of the 2 layers saves its attention and MLP activations; with it, a
    # non-reentrant checkpoint keeps them out of autograd's saved tensors (a no-op would give exactly 1.0)
    assert gc["saved_bytes"] < 0.5 * gc["saved_bytes_flipped"]

    model, _, _ = LlavaModel.from_pretrained(tmp_path / "run")  # generation and evaluation load this way
    assert not model.llm.training and not model.projector.training


def test_lora_dropout_is_active_during_training(llama_tokenizer_dir, shapes_dir, llm_dir, tmp_path, monkeypatch):
    cfg = path_config(llama_tokenizer_dir, shapes_dir, llm_dir, tmp_path / "run", lr=1e-3)
    cfg.model.lora = LoraSettings(r=4, alpha=8, dropout=0.05)
    facts = probed_run(cfg, tmp_path, monkeypatch)
    modes = facts["modes"]
    assert modes["dropout_modules"] == 14  # 7 adapted linear maps x 2 layers, one lora_dropout each
    assert modes["dropout_active"] == modes["dropout_modules"]
    assert facts["master_dtypes"] == ["float32"] and not facts["frozen"]["changed"]


def test_trainable_bf16_weights_without_fp32_masters_are_refused(llama_tokenizer_dir, shapes_dir, llm_dir, tmp_path):
    """AdamW on bf16 weights at lr 2e-5 loses most updates to rounding; only DeepSpeed keeps fp32 masters here."""
    cfg = path_config(llama_tokenizer_dir, shapes_dir, llm_dir, tmp_path / "run", lr=2e-5)
    cfg.model.llm.dtype = "bfloat16"
    with pytest.raises(ValueError, match=r"bfloat16 .*fp32 master.*train\.deepspeed=.*model\.llm\.dtype=float32"):
        train(cfg)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_frozen_bf16_llm_still_trains_its_fp32_projector(llama_tokenizer_dir, shapes_dir, llm_dir, tmp_path):
    """Stage 1 with the recipe's bf16 LLM: nothing trainable is 16-bit, so nothing is refused."""
    cfg = run_config(llama_tokenizer_dir, shapes_dir, tmp_path / "run", stage=1, max_steps=1)
    cfg.model.llm.config, cfg.model.llm.path, cfg.model.llm.dtype = None, str(llm_dir), "bfloat16"
    train(cfg)
    assert (tmp_path / "run" / "projector.safetensors").is_file()


@pytest.mark.parametrize("total,ratio,schedule", [(10, 0.03, "cosine"), (100, 0.03, "cosine"), (2181, 0.03, "cosine"),
                                                  (7, 0.0, "cosine"), (50, 0.1, "constant"), (1, 0.03, "cosine")])
def test_lr_schedule_is_transformers_cosine_with_warmup(total, ratio, schedule):
    """HF Trainer (LLaVA's reference runs): warmup = ceil(total x ratio) steps, step 0 at LR 0, then
    get_cosine_schedule_with_warmup / get_constant_schedule_with_warmup."""
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    warmup = math.ceil(total * ratio)
    sched = (get_cosine_schedule_with_warmup(opt, warmup, total) if schedule == "cosine"
             else get_constant_schedule_with_warmup(opt, warmup))
    ours = lr_lambda(total, ratio, schedule)
    for step in range(total):
        assert ours(step) == pytest.approx(sched.get_last_lr()[0], rel=1e-12, abs=1e-15), step
        opt.step()
        sched.step()
