"""A timm VisionTransformer, e.g. DINOv2 (`vit_large_patch14_dinov2.lvd142m`; `model_kwargs: {img_size: 336}`).

`pretrained`: None = random init, a local weights file, or any other value = timm's own weights for `model`.
Prefix tokens (CLS, registers) are dropped for "patch".
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from llava_sft.model.vision import VisionConfig, VisionTower


class TimmViTVisionTower(VisionTower):
    def __init__(self, cfg: VisionConfig):
        super().__init__(cfg)
        self.trunk = self.build_trunk(cfg)
        self.num_prefix_tokens = self.trunk.num_prefix_tokens
        self.block_index = self.check_select_layer(len(self.trunk.blocks))
        self.hidden_size, self.num_patches = self.trunk.embed_dim, self.trunk.patch_embed.num_patches
        self.image_size = self.trunk.patch_embed.img_size[0]
        data = self.trunk.pretrained_cfg
        self.image_mean, self.image_std = tuple(data.get("mean", self.image_mean)), tuple(data.get("std", self.image_std))

    def build_trunk(self, cfg: VisionConfig) -> nn.Module:
        import timm

        file = {"pretrained_cfg_overlay": {"file": cfg.pretrained}} if cfg.pretrained and Path(cfg.pretrained).is_file() else {}
        return timm.create_model(cfg.model, pretrained=bool(cfg.pretrained), num_classes=0, **file, **(cfg.model_kwargs or {}))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        cls = self.cfg.select_feature == "cls_patch"
        out, = self.trunk.forward_intermediates(
            pixels.to(self.trunk.patch_embed.proj.weight.dtype), indices=[self.block_index], norm=False,
            output_fmt="NLC", intermediates_only=True, return_prefix_tokens=cls)  # prefix tokens dropped unless cls
        return torch.cat([out[1], out[0]], dim=1) if cls else out
