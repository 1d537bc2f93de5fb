"""Frozen vision encoders: a base-class contract, a registry, and the open_clip CLIP ViT.

Contract (`VisionTower`): `forward(pixels[N,3,H,W]) -> features[N, num_patches(+1), hidden_size]`,
plus `hidden_size`, `num_tokens` (tokens per image after feature selection), `image_size`,
`image_mean`/`image_std`. Towers are frozen by `freeze()`: no grad, eval mode (kept in eval mode
even when the parent module is put in train mode), never handed to the optimizer.

Adding an encoder = one subclass + `@register_vision_tower("name")`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

log = logging.getLogger(__name__)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class VisionConfig:
    """Which encoder, which weights, which features. Saved with every checkpoint."""

    name: str = "openclip"  # registry key
    model: str = "ViT-L-14-336"  # open_clip architecture name
    pretrained: str | None = "openai"  # open_clip tag, or a local weights file; None = random init
    cache_dir: str | None = None  # open_clip download cache (pre-filled for offline clusters)
    model_config_file: str | None = None  # JSON architecture to register with open_clip (tiny test towers)
    quick_gelu: bool = True  # OpenAI CLIP was trained with QuickGELU; the features are wrong without it
    select_layer: int = -2  # hidden-state index as in HF (-1 = last block, -2 = penultimate block)
    select_feature: str = "patch"  # "patch" (CLS dropped) or "cls_patch"


class VisionTower(nn.Module):
    """Base class: a frozen image encoder producing per-patch features."""

    hidden_size: int
    num_patches: int
    image_size: int
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        if cfg.select_feature not in ("patch", "cls_patch"):
            raise ValueError(f"vision.select_feature must be 'patch' or 'cls_patch', got {cfg.select_feature!r}")
        self.cfg = cfg

    @property
    def num_tokens(self) -> int:
        return self.num_patches + (1 if self.cfg.select_feature == "cls_patch" else 0)

    def freeze(self) -> "VisionTower":
        self.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True):  # a frozen tower stays in eval mode (no dropout, fixed norms)
        return super().train(False)


_REGISTRY: dict[str, Callable[[VisionConfig], VisionTower]] = {}


def register_vision_tower(name: str):
    def wrap(cls):
        _REGISTRY[name] = cls
        return cls

    return wrap


def build_vision_tower(cfg: VisionConfig) -> VisionTower:
    if cfg.name not in _REGISTRY:
        raise ValueError(f"unknown vision tower {cfg.name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[cfg.name](cfg).freeze()


@register_vision_tower("openclip")
class OpenClipVisionTower(VisionTower):
    """An open_clip ViT (CLIP ViT-L/14 at 224 or 336 px by default); only its image tower is kept."""

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
            require_pretrained=bool(pretrained),
        )
        self.visual = clip.visual
        del clip  # the text tower is never used
        depth = len(self.visual.transformer.resblocks)
        block = depth + cfg.select_layer if cfg.select_layer < 0 else cfg.select_layer - 1
        if not 0 <= block < depth:
            raise ValueError(f"vision.select_layer {cfg.select_layer} is out of range for a {depth}-block ViT")
        self.block_index = block  # index of the transformer block whose output we read
        self.hidden_size = self.visual.transformer.width
        grid = self.visual.grid_size
        self.num_patches = grid[0] * grid[1]
        size = self.visual.image_size
        self.image_size = size[0] if isinstance(size, (tuple, list)) else size
        mean, std = getattr(self.visual, "image_mean", None), getattr(self.visual, "image_std", None)
        self.image_mean, self.image_std = tuple(mean or OPENAI_CLIP_MEAN), tuple(std or OPENAI_CLIP_STD)
        log.info(
            "vision tower %s (pretrained=%s, quick_gelu=%s): %d px, %d patches, width %d, features of block %d/%d",
            cfg.model, pretrained, cfg.quick_gelu, self.image_size, self.num_patches, self.hidden_size, block + 1, depth,
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
