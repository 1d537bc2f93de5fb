"""Projectors map vision features into the LLM's embedding space.

Registry keys: `linear` (LLaVA v1), `mlp{N}x_gelu` (N Linear layers with GELU between them;
`mlp2x_gelu` is LLaVA-1.5's), `identity` (vision width must equal the LLM width).
"""
from __future__ import annotations

import re

from torch import nn

_MLP = re.compile(r"^mlp(\d+)x_gelu$")


def build_projector(kind: str, vision_dim: int, llm_dim: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(vision_dim, llm_dim)
    if kind == "identity":
        if vision_dim != llm_dim:
            raise ValueError(f"projector 'identity' needs vision width ({vision_dim}) == LLM width ({llm_dim})")
        return nn.Identity()
    match = _MLP.match(kind)
    if match and int(match.group(1)) >= 1:
        layers: list[nn.Module] = [nn.Linear(vision_dim, llm_dim)]
        for _ in range(int(match.group(1)) - 1):
            layers += [nn.GELU(), nn.Linear(llm_dim, llm_dim)]
        return nn.Sequential(*layers)
    raise ValueError(f"unknown projector {kind!r}: use 'linear', 'identity' or 'mlp<N>x_gelu' (e.g. 'mlp2x_gelu')")
