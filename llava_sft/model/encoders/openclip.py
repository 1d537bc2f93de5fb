"""open_clip CLIP ViT (ViT-L/14 at 224 px, ViT-L/14-336 for LLaVA-1.5); only the image tower is kept."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from llava_sft.model.vision import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, VisionConfig, VisionTower

log = logging.getLogger(__name__)


class OpenClipVisionTower(VisionTower):
    def __init__(self, cfg: VisionConfig):
        super().__init__(cfg)
        import open_clip

        if cfg.model_config_file:
            open_clip.add_model_config(Path(cfg.model_config_file))
        pretrained = cfg.pretrained or None
        if pretrained and Path(pretrained).suffix and not Path(pretrained).is_file():
            raise FileNotFoundError(f"vision.pretrained weights file not found: {pretrained}")
        clip = open_clip.create_model(
            cfg.model, pretrained=pretrained, force_quick_gelu=cfg.quick_gelu, cache_dir=cfg.cache_dir or None,
            require_pretrained=bool(pretrained), **(cfg.model_kwargs or {}),
        )
        self.visual = clip.visual
        del clip  # the text tower is never used
        depth = len(self.visual.transformer.resblocks)
        self.block_index = self.check_select_layer(depth)  # index of the transformer block whose output we read
        self.hidden_size = self.visual.transformer.width
        grid = self.visual.grid_size
        self.num_patches = grid[0] * grid[1]
        size = self.visual.image_size
        self.image_size = size[0] if isinstance(size, (tuple, list)) else size
        mean, std = getattr(self.visual, "image_mean", None), getattr(self.visual, "image_std", None)
        self.image_mean, self.image_std = tuple(mean or OPENAI_CLIP_MEAN), tuple(std or OPENAI_CLIP_STD)
        log.info(
            "vision tower %s (pretrained=%s, quick_gelu=%s): %d px, %d patches, width %d, features of block %d/%d",
            cfg.model, pretrained, cfg.quick_gelu, self.image_size, self.num_patches, self.hidden_size,
            self.block_index + 1, depth,
        )

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.visual.forward_intermediates(
            pixels.to(self.visual.conv1.weight.dtype), indices=[self.block_index], stop_early=True,
            intermediates_only=True, output_fmt="NLC", output_extra_tokens=True,
        )
        patches = out["image_intermediates"][0]
        if self.cfg.select_feature == "cls_patch":
            patches = torch.cat([out["image_intermediates_prefix"][0], patches], dim=1)
        return patches
