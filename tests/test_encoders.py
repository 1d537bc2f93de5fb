"""Every registered vision encoder, tiny: builds, reads the selected layer, stays frozen, trains a Stage-1 step."""
from __future__ import annotations

import json

import pytest
import torch

from data_prep.make_shapes import generate as make_shapes
from llava_sft.config import from_dict
from llava_sft.model.vision import VisionConfig, build_vision_tower, list_vision_towers
from llava_sft.train.trainer import DDPEngine, build, param_groups, seed_everything, train, train_step
from tests.test_training import batches_of
from tests.tiny import run_config
from tests.tiny_encoders import tiny_vision_configs


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    return tiny_vision_configs(tmp_path_factory.mktemp("encoders"))


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    make_shapes(out, seed=0, image_size=32, n_stage1=16, n_stage2=8, n_eval=2, text_only_frac=0.0)
    return out


def test_every_registered_encoder_has_a_tiny_config(configs):
    assert sorted(configs) == list_vision_towers()


def reference_hidden_states(tower, pixels):
    """HF-style hidden states (embeddings, then each block's output), computed with the library directly."""
    name = tower.cfg.name
    if name in ("hf_clip", "hf_siglip"):
        return tower.model(pixels, output_hidden_states=True).hidden_states
    if name == "openclip":
        hidden = [tower.visual._embeds(pixels)]
        blocks = tower.visual.transformer.resblocks
    else:  # timm trunks (timm, openclip_siglip)
        trunk = tower.trunk
        hidden = [trunk.norm_pre(trunk.patch_drop(trunk._pos_embed(trunk.patch_embed(pixels))))]
        blocks = trunk.blocks
    for block in blocks:
        hidden.append(block(hidden[-1]))
    return hidden


@pytest.mark.parametrize("name", list_vision_towers())
def test_encoder_builds_frozen_and_returns_the_selected_patch_features(configs, name):
    torch.manual_seed(0)
    tower = build_vision_tower(from_dict(VisionConfig, configs[name]))
    assert not any(p.requires_grad for p in tower.parameters())
    tower.train()
    assert not tower.training  # frozen towers stay in eval mode
    pixels = torch.randn(2, 3, tower.image_size, tower.image_size)
    features = tower(pixels)
    assert features.shape == (2, tower.num_tokens, tower.hidden_size) and tower.num_tokens == tower.num_patches
    with torch.no_grad():
        hidden = reference_hidden_states(tower, pixels)
    prefix = {"openclip": 1, "hf_clip": 1, "hf_siglip": 0, "openclip_siglip": 0, "timm": 5}[name]  # CLS / registers
    assert tower.num_prefix_tokens == prefix
    expected = hidden[tower.cfg.select_layer][:, prefix:]
    assert expected.shape[1] == tower.num_patches
    assert torch.allclose(features, expected, atol=1e-5)
    assert len(tower.image_mean) == len(tower.image_std) == 3


@pytest.mark.parametrize("name", list_vision_towers())
def test_encoder_runs_a_stage1_step_end_to_end(configs, shapes_dir, llama_tokenizer_dir, tmp_path, name):
    cfg = run_config(llama_tokenizer_dir, shapes_dir, tmp_path / "run", stage=1, max_steps=1)
    cfg.model.vision = from_dict(VisionConfig, configs[name])
    seed_everything(0)
    model, _, dataset = build(cfg, torch.device("cpu"))
    model.set_trainable(cfg.train.train_projector, cfg.train.train_llm)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(param_groups(model, 0.0, 1e-2), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    train_step(DDPEngine.local(model, opt, sched, cfg.train), batches_of(dataset, list(range(8)), 4),
               torch.device("cpu"), False, dataset.report)
    after = model.state_dict()
    for key, value in before.items():  # only the projector trains; the tower and the LLM stay as they were
        assert torch.equal(value, after[key]) != key.startswith("projector."), key

    train(cfg)  # the real entry point: one optimizer step, the Stage-1 output written
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["loss"] > 0
    saved = json.loads((tmp_path / "run" / "llava_config.json").read_text())
    assert saved["model"]["vision"]["name"] == name and (tmp_path / "run" / "projector.safetensors").is_file()


@pytest.mark.parametrize("name", list_vision_towers())
def test_a_saved_model_directory_rebuilds_the_same_encoder(configs, shapes_dir, llama_tokenizer_dir, tmp_path, name):
    from llava_sft.model.llava import LlavaModel

    cfg = run_config(llama_tokenizer_dir, shapes_dir, tmp_path / "run", stage=1)
    cfg.model.vision = from_dict(VisionConfig, configs[name])
    model, tokenizer, _ = build(cfg, torch.device("cpu"))
    model.save_pretrained(tmp_path / "saved", tokenizer, {"template": "vicuna_v1"})
    loaded, _, saved = LlavaModel.from_pretrained(tmp_path / "saved")
    pixels = torch.randn(1, 3, model.vision_tower.image_size, model.vision_tower.image_size)
    assert torch.equal(loaded.vision_tower(pixels), model.vision_tower(pixels))
    assert saved["image"]["mean"] == list(model.vision_tower.image_mean)
