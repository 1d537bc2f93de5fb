"""Frozen vision encoders: the base-class contract and the registry. The encoders live in model/encoders/.

Contract (`VisionTower`), what every encoder provides:
    __init__(cfg)     build the encoder from `cfg` (`cfg.model` names the architecture, `cfg.pretrained` the
                      weights, None = random init; `cfg.model_config_file` / `cfg.model_kwargs` adjust it)
    forward(pixels)   [N, 3, image_size, image_size] normalised pixels -> [N, num_tokens, hidden_size] features:
                      the hidden states of `cfg.select_layer` (HF indexing: 0 = embeddings, i = output of block i,
                      -1 = last block, -2 = penultimate), prefix tokens (CLS, registers) dropped for "patch",
                      the CLS token kept in front for "cls_patch" (`select_hidden_state` does this)
    hidden_size       feature width;  num_patches  patch tokens per image;  image_size  input side in pixels
    image_mean/std    normalisation the encoder was trained with;  num_prefix_tokens  tokens before the patches
Freezing is the base class's (`freeze()`: no grad, eval mode kept even when the parent is put in train mode);
a frozen tower is never handed to the optimizer. `train.train_vision_tower` unfreezes its weights
(`LlavaModel.set_trainable`; it stays in eval mode), so `forward` must not disable autograd itself: the caller
decides (`LlavaModel.encode_images` runs it without grad unless it trains).

Adding an encoder = one small file in model/encoders/ with a `VisionTower` subclass + one line in `ENCODERS`
below (or `@register_vision_tower("name")` on a class defined anywhere). See docs/encoders.md.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
from typing import Callable

import torch
from torch import nn

from llava_sft import registry
from llava_sft.config import VisionConfig  # noqa: F401  (the schema lives in the torch-free config)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


_WEIGHTS_LOADED_AFTERWARDS: contextvars.ContextVar[str | None] = contextvars.ContextVar("weights", default=None)


@contextlib.contextmanager
def weights_loaded_afterwards(source: str):
    """While a trained model's tower is built only to receive its saved weights (LlavaModel.from_pretrained),
    `weights_description` names that source instead of "random init"."""
    token = _WEIGHTS_LOADED_AFTERWARDS.set(source)
    try:
        yield
    finally:
        _WEIGHTS_LOADED_AFTERWARDS.reset(token)


def weights_description(pretrained: str | None) -> str:
    """What a tower's log line says about its weights."""
    return pretrained or _WEIGHTS_LOADED_AFTERWARDS.get() or "random init"


class VisionTower(nn.Module):
    """Base class: a frozen image encoder producing per-patch features (see the module docstring)."""

    hidden_size: int
    num_patches: int
    image_size: int
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    num_prefix_tokens: int = 1  # CLS (+ register tokens) before the patch tokens; 0 for SigLIP-style towers

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        if cfg.select_feature not in ("patch", "cls_patch"):
            raise ValueError(f"vision.select_feature must be 'patch' or 'cls_patch', got {cfg.select_feature!r}")
        self.cfg = cfg

    @property
    def num_tokens(self) -> int:
        return self.num_patches + (1 if self.cfg.select_feature == "cls_patch" else 0)

    def check_select_layer(self, depth: int) -> int:
        """Index of the block whose output `select_layer` reads (0-based); clear error when out of range."""
        layer = self.cfg.select_layer
        block = depth + layer if layer < 0 else layer - 1
        if not 0 <= block < depth:
            raise ValueError(f"vision.select_layer {layer} is out of range for a {depth}-block encoder")
        if self.cfg.select_feature == "cls_patch" and self.num_prefix_tokens != 1:
            raise ValueError(f"vision.select_feature 'cls_patch' needs exactly one CLS token; {self.cfg.name} "
                             f"has {self.num_prefix_tokens} prefix tokens")
        return block

    def select_hidden_state(self, hidden_states) -> torch.Tensor:
        """HF-style hidden states (embeddings, then every block's output) -> the selected features."""
        h = hidden_states[self.cfg.select_layer]
        return h if self.cfg.select_feature == "cls_patch" else h[:, self.num_prefix_tokens:]

    def freeze(self) -> "VisionTower":
        self.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True):  # a frozen tower stays in eval mode (no dropout, fixed norms)
        return super().train(False)


ENCODERS = registry.VISION_TOWERS  # registry key -> "module:Class", imported on first use (llava_sft/registry.py)
_REGISTRY: dict[str, Callable[[VisionConfig], VisionTower]] = {}


def register_vision_tower(name: str):
    """Class decorator registering an encoder defined outside `ENCODERS` (e.g. in a user's own module)."""
    def wrap(cls):
        _REGISTRY[name] = cls
        registry.REGISTERED_TOWERS.add(name)  # a config naming it is valid from now on
        return cls

    return wrap


def list_vision_towers() -> list[str]:
    return registry.vision_tower_names()


def get_vision_tower_class(name: str) -> Callable[[VisionConfig], VisionTower]:
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name not in ENCODERS:
        raise ValueError(f"unknown vision tower {name!r}; registered: {', '.join(list_vision_towers())}")
    module, cls = ENCODERS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def build_vision_tower(cfg: VisionConfig) -> VisionTower:
    return get_vision_tower_class(cfg.name)(cfg).freeze()
