"""Tiny random-init configs for every registered vision encoder (nothing downloaded)."""
from __future__ import annotations

import json
from pathlib import Path

from tests.tiny import TEST_VIT

TINY_TIMM_SIGLIP = "test_vit_siglip_tiny"


def register_tiny_timm_siglip() -> None:
    """A 2-block SigLIP-style timm ViT (no CLS token, MAP head), as open_clip's SigLIP image towers are."""
    import timm
    from timm.models import register_model
    from timm.models.vision_transformer import _create_vision_transformer

    if timm.is_model(TINY_TIMM_SIGLIP):
        return

    @register_model
    def test_vit_siglip_tiny(pretrained=False, **kwargs):
        args = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, class_token=False,
                    global_pool="map")
        return _create_vision_transformer("vit_base_patch16_siglip_224", pretrained=pretrained, **dict(args, **kwargs))


def tiny_vision_configs(folder: Path) -> dict[str, dict]:
    """Registry key -> `model.vision` dict of a tiny tower of that kind (config files written into `folder`)."""
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    register_tiny_timm_siglip()
    folder.mkdir(parents=True, exist_ok=True)
    small = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=3, image_size=32,
                 patch_size=8)
    CLIPVisionConfig(**small, hidden_act="quick_gelu").to_json_file(folder / "clip.json")
    SiglipVisionConfig(**small, vision_use_head=False).to_json_file(folder / "siglip.json")
    (folder / "test-siglip.json").write_text(json.dumps({
        "embed_dim": 32, "init_logit_bias": -10, "custom_text": True,
        "vision_cfg": {"image_size": 32, "timm_model_name": TINY_TIMM_SIGLIP, "timm_model_pretrained": False,
                       "timm_pool": "map", "timm_proj": "none"},
        "text_cfg": {"context_length": 8, "vocab_size": 32, "width": 32, "heads": 2, "layers": 1, "no_causal_mask": True,
                     "proj_bias": True, "pool_type": "last"},
    }))
    return {
        "openclip": {"name": "openclip", "model": "test-vit", "model_config_file": TEST_VIT, "pretrained": None},
        "openclip_siglip": {"name": "openclip_siglip", "model": "test-siglip", "pretrained": None,
                            "model_config_file": str(folder / "test-siglip.json"), "select_layer": -1},
        "hf_clip": {"name": "hf_clip", "model": "clip", "model_config_file": str(folder / "clip.json"), "pretrained": None},
        "hf_siglip": {"name": "hf_siglip", "model": "siglip", "model_config_file": str(folder / "siglip.json"),
                      "pretrained": None},
        "timm": {"name": "timm", "model": "vit_small_patch14_reg4_dinov2", "pretrained": None,  # DINOv2 + 4 registers
                 "model_kwargs": {"img_size": 28, "depth": 2, "embed_dim": 48, "num_heads": 3}},
    }
