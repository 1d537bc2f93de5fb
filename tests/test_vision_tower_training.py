"""`train.train_vision_tower` (LLaVA-NeXT's unfreeze_mm_vision_tower) with its own LR (`train.vision_tower_lr`,
LLaVA-NeXT's mm_vision_tower_lr): off by default, where the tower's saved weights are bit-identical to the ones it
loaded; on, the tower's weights move, at its own learning rate; settings it cannot honour are refused at load.
The LLM comes from a directory and the tower from a weights file, as in the recipes."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from data_prep.make_shapes import generate as make_shapes
from llava_sft.config import ConfigError, load_config, save_config
from llava_sft.model.llava import LlavaModel
from llava_sft.train.optim import param_groups
from llava_sft.train.trainer import build, train
from tests.tiny import TEST_VIT, run_config


@pytest.fixture(scope="module")
def setup(llama_tokenizer_dir, tmp_path_factory):
    """Shapes data, a tiny LLM directory and a tower weights file (what `model.vision.pretrained` names)."""
    import open_clip

    root = tmp_path_factory.mktemp("tower_training")
    make_shapes(root / "data", seed=5, image_size=32, n_stage1=4, n_stage2=16, n_eval=2, text_only_frac=0.0)
    torch.manual_seed(0)
    cfg = run_config(llama_tokenizer_dir, root / "data", root / "unused", stage=2)
    model, tokenizer, _ = build(cfg, torch.device("cpu"))
    model.llm.save_pretrained(root / "llm")
    tokenizer.save_pretrained(root / "llm")
    open_clip.add_model_config(TEST_VIT)
    torch.save(open_clip.create_model("test-vit", force_quick_gelu=True).state_dict(), root / "tower.pt")
    return root


def config(tokenizer_dir, root, name, **train_kw):
    cfg = run_config(tokenizer_dir, root / "data", root / name, stage=2, max_steps=2, **train_kw)
    cfg.model.llm.config, cfg.model.llm.path = None, str(root / "llm")
    cfg.model.vision.pretrained = str(root / "tower.pt")
    return cfg


def tower_change(root, name) -> float:
    """The largest change of any saved tower weight against the file it was loaded from."""
    loaded = {k[len("visual."):]: v for k, v in torch.load(root / "tower.pt").items() if k.startswith("visual.")}
    saved = load_file(str(root / name / "vision_tower.safetensors"))
    saved = {k[len("visual."):] if k.startswith("visual.") else k: v for k, v in saved.items()}
    assert set(saved) == set(loaded)
    return max(float((saved[k] - loaded[k]).abs().max()) for k in loaded)


def reported(root, name) -> dict:
    """report.json's per-module parameter counts (what the start-up log prints), against the saved model's own."""
    import json

    counts = json.loads((root / name / "report.json").read_text())["parameters"]
    model, _, _ = LlavaModel.from_pretrained(root / name)
    for module in ("vision_tower", "projector", "llm"):
        assert counts[module]["total"] == sum(p.numel() for p in getattr(model, module).parameters()), module
    return {module: c["trainable"] for module, c in counts.items()}


def test_the_tower_is_frozen_by_default_and_its_weights_are_bit_identical(llama_tokenizer_dir, setup):
    train(config(llama_tokenizer_dir, setup, "frozen"))
    assert tower_change(setup, "frozen") == 0.0
    trainable = reported(setup, "frozen")
    assert trainable["vision_tower"] == 0 and trainable["projector"] > 0 and trainable["llm"] > 0


def test_a_trained_tower_moves_at_its_own_learning_rate(llama_tokenizer_dir, setup):
    train(config(llama_tokenizer_dir, setup, "trained", train_vision_tower=True, vision_tower_lr=1e-3))
    assert tower_change(setup, "trained") > 1e-4  # two AdamW steps of about lr each
    LlavaModel.from_pretrained(setup / "trained")  # the saved directory loads with its tower
    assert reported(setup, "trained")["vision_tower"] > 0
    # its own LR is applied: an AdamW step moves a weight by about lr (|m / sqrt(v)| <= ~1), so at 1e-30 the
    # tower's weights move by ~1e-30 at most (zero biases visibly, the rest rounds away) while the LLM trains at lr
    train(config(llama_tokenizer_dir, setup, "tiny_lr", train_vision_tower=True, vision_tower_lr=1e-30))
    assert tower_change(setup, "tiny_lr") < 1e-28


def test_the_tower_gets_its_own_parameter_groups(llama_tokenizer_dir, setup):
    model, _, _ = build(config(llama_tokenizer_dir, setup, "groups"), torch.device("cpu"))
    model.set_trainable(True, True, True)
    groups = param_groups(model, 0.1, 2e-5, projector_lr=1e-4, vision_tower_lr=1e-6)
    tower = {id(p) for p in model.vision_tower.parameters()}
    projector = {id(p) for p in model.projector.parameters()}
    for group in groups:
        ids = {id(p) for p in group["params"]}
        expected = 1e-6 if ids <= tower else 1e-4 if ids <= projector else 2e-5
        assert not (ids & tower and ids - tower) and group["lr"] == expected
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in model.parameters() if p.requires_grad)
    # the tower trains what its features depend on: select_layer -2 of the test ViT's 3 blocks reads block 2 of 3,
    # so the last block, the final norm and CLIP's projection get no gradient and stay frozen (else DDP raises)
    frozen = {n for n, p in model.vision_tower.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.vision_tower.named_parameters()
                      if n.startswith(("visual.transformer.resblocks.2.", "visual.ln_post.")) or n == "visual.proj"}
    trains = {id(p) for p in model.vision_tower.parameters() if p.requires_grad}
    assert trains and trains <= {id(p) for g in groups for p in g["params"]}
    model.set_trainable(True, True)  # the default: frozen again, in no group
    assert not tower & {id(p) for g in param_groups(model, 0.1, 2e-5) for p in g["params"]}


@pytest.mark.parametrize("overrides,message", [
    (["train.train_vision_tower=true", "train.engine=fsdp2"], "FSDP2 keeps the vision tower whole"),
    (["train.train_vision_tower=true", "train.save_full_model=false"], "projector-only output would drop"),
    (["train.vision_tower_lr=1e-5"], "the tower is frozen"),
    (["train.train_vision_tower=true", "train.vision_tower_lr=0"], r"vision_tower_lr=0(\.0)? must be > 0"),
])
def test_tower_settings_that_cannot_work_are_refused_when_the_config_loads(llama_tokenizer_dir, setup, tmp_path,
                                                                           overrides, message):
    save_config(config(llama_tokenizer_dir, setup, "refused"), tmp_path / "cfg.yaml")
    with pytest.raises(ConfigError, match=message):
        load_config(tmp_path / "cfg.yaml", overrides)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_text_only_micro_batch_under_two_rank_ddp_gives_the_training_tower_a_zero_gradient(setup, llama_tokenizer_dir,
                                                                                           tmp_path):
    """DDP (find_unused_parameters=False) needs a gradient for every trainable parameter at every step: a text-only
    micro-batch's zero-weighted anchor must cover the tower when it trains, not only the projector (else DDP raised
    "Expected to have finished reduction in the prior iteration" at the next forward)."""
    import json
    import os
    import subprocess
    import sys

    make_shapes(tmp_path / "data", seed=6, image_size=32, n_stage1=4, n_stage2=32, n_eval=2, text_only_frac=0.5)
    cfg = config(llama_tokenizer_dir, setup, "unused", train_vision_tower=True, vision_tower_lr=1e-4,
                 global_batch_size=4, micro_batch_size=2)
    cfg.train.max_steps = 6
    cfg.data.path, cfg.data.image_folder = str(tmp_path / "data" / "stage2.json"), str(tmp_path / "data" / "images")
    cfg.data.group_by_modality = True  # whole micro-batches of text only
    cfg.train.output_dir = str(tmp_path / "run")
    save_config(cfg, tmp_path / "run.yaml")
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                             "29681", "-m", "llava_sft.train", str(tmp_path / "run.yaml")], capture_output=True,
                            text=True, env=env, timeout=380)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    records = json.loads((tmp_path / "data" / "stage2.json").read_text())
    assert any("image" not in r for r in records) and any("image" in r for r in records)
