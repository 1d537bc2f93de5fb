"""The shipped recipes say what the papers say (LLaVA-1.5 Table/scripts, LLaVA v1), and every config loads."""
from __future__ import annotations

from pathlib import Path

import pytest

from llava_sft.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.train.output_dir and cfg.data.path


def test_llava_v1_5_recipes():
    s1 = load_config(CONFIGS / "llava_v1_5" / "stage1_pretrain_7b.yaml")
    assert s1.data.path.endswith("blip_laion_cc_sbu_558k.json") and s1.data.template == "plain"
    assert (s1.train.train_projector, s1.train.train_llm) == (True, False)
    assert (s1.train.global_batch_size, s1.train.lr, s1.train.epochs) == (256, 1e-3, 1.0)
    assert (s1.train.warmup_ratio, s1.train.lr_schedule, s1.train.weight_decay) == (0.03, "cosine", 0.0)
    assert s1.data.max_length == 2048 and s1.model.vision.model == "ViT-L-14-336"
    assert (s1.model.vision.pretrained, s1.model.vision.quick_gelu, s1.model.vision.select_layer) == ("openai", True, -2)
    assert s1.model.projector == "mlp2x_gelu"
    # the reference run's effective settings: pretrain.sh passes no --image_aspect_ratio (LLaVA's default
    # 'square': resize + centre crop; only finetune.sh pads), and no DeepSpeed JSON of LLaVA sets gradient_clipping
    assert s1.model.image_aspect == "square" and s1.train.grad_clip == 0.0

    s2 = load_config(CONFIGS / "llava_v1_5" / "stage2_finetune_7b.yaml")
    assert s2.data.path.endswith("llava_v1_5_mix665k.json") and s2.data.template == "vicuna_v1"
    assert (s2.train.train_projector, s2.train.train_llm) == (True, True)
    assert (s2.train.global_batch_size, s2.train.lr, s2.train.epochs) == (128, 2e-5, 1.0)
    assert s2.model.image_aspect == "pad" and s2.data.group_by_modality
    assert s2.train.pretrained_projector == s1.train.output_dir  # Stage 2 picks up Stage 1's projector
    assert s2.model.lora is None and s2.train.grad_clip == 0.0


@pytest.mark.parametrize("kind", ["lora", "qlora"])
def test_llava_v1_5_lora_recipes(kind):
    full = load_config(CONFIGS / "llava_v1_5" / "stage2_finetune_7b.yaml")
    cfg = load_config(CONFIGS / "llava_v1_5" / f"stage2_finetune_7b_{kind}.yaml")
    lora = cfg.model.lora
    assert (lora.r, lora.alpha, lora.dropout, lora.target_modules) == (128, 256, 0.05, None)
    assert lora.quantize == ("nf4" if kind == "qlora" else None)
    assert (cfg.train.lr, cfg.train.projector_lr) == (2e-4, 2e-5)
    assert cfg.train.output_dir != full.train.output_dir and cfg.train.grad_clip == 0.0
    assert (cfg.data.path, cfg.train.global_batch_size, cfg.train.epochs) == (
        full.data.path, full.train.global_batch_size, full.train.epochs)


def test_llava_v1_recipes():
    s1 = load_config(CONFIGS / "llava_v1" / "stage1_cc3m.yaml")
    assert s1.data.template == "plain" and s1.model.vision.model == "ViT-L-14" and s1.model.projector == "linear"
    assert (s1.train.global_batch_size, s1.train.lr) == (128, 2e-3)
    s2 = load_config(CONFIGS / "llava_v1" / "stage2_instruct158k.yaml")
    assert s2.data.path.endswith("llava_instruct_150k.json") and s2.data.template == "vicuna_v1"
    assert (s2.train.global_batch_size, s2.train.lr, s2.train.epochs) == (32, 2e-5, 3.0)
    # the April 2023 release these follow trained through HF Trainer (FSDP), which clips at max_grad_norm 1.0
    assert s1.train.grad_clip == s2.train.grad_clip == 1.0
    assert s1.model.image_aspect == s2.model.image_aspect == "square"


def test_deepspeed_engines_of_the_recipes():
    """Stage 1 under ZeRO-2, full and LoRA Stage 2 under ZeRO-3, QLoRA under ZeRO-2 (as LLaVA's scripts); the
    shipped DeepSpeed JSONs resolve for 8 GPUs to the recipe's batch, clipping and bf16, with our optimizer."""
    from llava_sft.train.engines.deepspeed import resolve_config, zero_stage

    expected = {"llava_v1_5/stage1_pretrain_7b.yaml": 2, "llava_v1_5/stage2_finetune_7b.yaml": 3,
                "llava_v1_5/stage2_finetune_7b_lora.yaml": 3, "llava_v1_5/stage2_finetune_7b_qlora.yaml": 2,
                "llava_v1/stage1_cc3m.yaml": 2, "llava_v1/stage2_instruct158k.yaml": 3}
    for name, stage in expected.items():
        run = load_config(CONFIGS / name)
        t = run.train
        ds = resolve_config(t.deepspeed, t, world=8, cuda=True, quantized=bool(run.model.lora and run.model.lora.quantize))
        assert zero_stage(ds) == stage, name
        assert "optimizer" not in ds and "scheduler" not in ds
        assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"]) == (t.global_batch_size, t.micro_batch_size)
        assert ds["gradient_accumulation_steps"] * 8 * t.micro_batch_size == t.global_batch_size
        assert ds["gradient_clipping"] == t.grad_clip == (1.0 if name.startswith("llava_v1/") else 0.0)
        assert ds["bf16"]["enabled"] is True
    for name in ("zero2.json", "zero3.json", "zero3_offload.json"):
        raw = (CONFIGS / "deepspeed" / name).read_text()
        assert '"optimizer"' not in raw and '"scheduler"' not in raw
        if name.startswith("zero3"):
            assert '"stage3_gather_16bit_weights_on_model_save": true' in raw


def test_paper_recipes_weigh_tokens_as_the_reference_runs_did_and_the_demo_keeps_its_own():
    """LLaVA / LLaVA-1.5 trained with HF Trainer < 4.46: each micro-batch's token mean, averaged over accumulation
    steps and ranks. Each paper recipe says so itself (not by inheriting a default); the demo's pinned numbers were
    measured with global_tokens (and packing, which needs it)."""
    for path in sorted((CONFIGS / "llava_v1_5").glob("*.yaml")) + sorted((CONFIGS / "llava_v1").glob("*.yaml")):
        assert "loss_normalization: micro_batch_mean" in path.read_text(), path
        assert load_config(path).train.loss_normalization == "micro_batch_mean"
    for path in sorted((CONFIGS / "demo").glob("*.yaml")):
        assert load_config(path).train.loss_normalization == "global_tokens", path


def test_the_llava_next_recipe_is_llava_16s_released_config():
    """Values of the released liuhaotian/llava-v1.6-vicuna-7b config.json and the LLaVA-NeXT blog (the recipe names
    each source); Stage 1 is LLaVA-1.5's projector."""
    from llava_sft.train.engines.deepspeed import resolve_config, zero_stage

    cfg = load_config(CONFIGS / "llava_next" / "stage2_finetune_7b.yaml")
    m, t = cfg.model, cfg.train
    assert (m.image_aspect, m.unpad_rounding, m.vision.select_layer, m.projector) == ("anyres", "reference", -2,
                                                                                    "mlp2x_gelu")
    assert m.image_grid_pinpoints == [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    assert (cfg.data.max_length, cfg.data.template) == (4096, "vicuna_v1")
    assert (t.train_vision_tower, t.vision_tower_lr, t.lr, t.global_batch_size, t.epochs) == (True, 2e-6, 2e-5, 128, 1)
    assert (t.warmup_ratio, t.lr_schedule, t.weight_decay) == (0.03, "cosine", 0.0)
    assert t.pretrained_projector.endswith("llava-v1.5-7b-pretrain")
    assert t.loss_normalization == "micro_batch_mean"
    ds = resolve_config(t.deepspeed, t, world=8, cuda=True, quantized=False)
    assert zero_stage(ds) == 2  # a trained tower is refused under ZeRO-3 (docs/training.md)
    assert ds["gradient_accumulation_steps"] * 8 * t.micro_batch_size == t.global_batch_size
    text = (CONFIGS / "llava_next" / "stage2_finetune_7b.yaml").read_text()
    assert "UNCERTAIN" in text and "[cfg]" in text and "[blog]" in text
