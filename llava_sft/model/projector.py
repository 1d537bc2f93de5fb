"""Projectors map vision features into the LLM's embedding space.

A projector is one entry in `PROJECTORS`: a name and a builder `(vision_dim, llm_dim) -> nn.Module` taking
`[..., vision_dim]` to `[..., llm_dim]`. Shipped: `linear` (LLaVA v1), `identity` (vision width must equal
the LLM width) and the family `mlp{N}x_gelu` (N Linear layers with GELU between them; `mlp2x_gelu` is
LLaVA-1.5's). Add one with `@register_projector("name")` here, plus its golden case in
`tests/test_model.py::test_projector_registry_golden`.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from llava_sft import registry

Builder = Callable[[int, int], nn.Module]
PROJECTORS: dict[str, Builder] = {}
_MLP = registry.MLP_PROJECTOR


def register_projector(name: str) -> Callable[[Builder], Builder]:
    def add(builder: Builder) -> Builder:
        if name in PROJECTORS:
            raise ValueError(f"projector {name!r} is registered twice")
        PROJECTORS[name] = builder
        registry.PROJECTOR_NAMES.add(name)  # the config's check (torch-free) knows it from now on
        return builder
    return add


@register_projector("linear")
def linear(vision_dim: int, llm_dim: int) -> nn.Module:
    return nn.Linear(vision_dim, llm_dim)


@register_projector("identity")
def identity(vision_dim: int, llm_dim: int) -> nn.Module:
    if vision_dim != llm_dim:
        raise ValueError(f"projector 'identity' needs vision width ({vision_dim}) == LLM width ({llm_dim})")
    return nn.Identity()


def mlp_gelu(depth: int, vision_dim: int, llm_dim: int) -> nn.Module:
    """LLaVA-1.5's `mlp{depth}x_gelu`: Linear, then (GELU, Linear) x (depth - 1)."""
    layers: list[nn.Module] = [nn.Linear(vision_dim, llm_dim)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(llm_dim, llm_dim)]
    return nn.Sequential(*layers)


def build_projector(kind: str, vision_dim: int, llm_dim: int) -> nn.Module:
    if kind in PROJECTORS:
        return PROJECTORS[kind](vision_dim, llm_dim)
    match = _MLP.match(kind)
    if match and int(match.group(1)) >= 1:
        return mlp_gelu(int(match.group(1)), vision_dim, llm_dim)
    names = ", ".join(repr(k) for k in PROJECTORS)
    raise ValueError(f"unknown projector {kind!r}: use {names} or 'mlp<N>x_gelu' (e.g. 'mlp2x_gelu')")
