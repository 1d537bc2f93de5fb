"""open_clip SigLIP (e.g. `ViT-SO400M-14-SigLIP-384`, `pretrained: webli`): its image tower is a timm ViT
trunk without CLS token, so the timm encoder reads its features; open_clip supplies weights and normalisation.
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from llava_sft.model.encoders.timm_vit import TimmViTVisionTower
from llava_sft.model.vision import VisionConfig


class OpenClipSiglipVisionTower(TimmViTVisionTower):
    def build_trunk(self, cfg: VisionConfig) -> nn.Module:
        import open_clip

        if cfg.model_config_file:
            open_clip.add_model_config(Path(cfg.model_config_file))
        clip = open_clip.create_model(cfg.model, pretrained=cfg.pretrained or None, cache_dir=cfg.cache_dir or None,
                                      require_pretrained=bool(cfg.pretrained), **(cfg.model_kwargs or {}))
        trunk = clip.visual.trunk  # the text tower and the pooling head are never used
        trunk.pretrained_cfg = {**trunk.pretrained_cfg, "mean": clip.visual.image_mean, "std": clip.visual.image_std}
        return trunk
