"""Dynamic high resolution (AnyRes), the feature side: one image's projected tile features -> its token sequence.

Exact to haotian-liu/LLaVA `llava_arch.py` (`mm_patch_merge_type: spatial_unpad`; LLaVA-NeXT's `anyres_max_N`
branch for the interpolation), given the tiles data/anyres.py made:

    features [1 + gh*gw, side*side, D]  ->  base = features[0]                              [side*side, D]
    grid  = features[1:] viewed [gh, gw, side, side, D] -> [D, gh*side, gw*side]   (tiles stitched row-major)
    grid  = unpad(grid)                  the rows/columns that show the black padding removed (data/anyres.py)
    grid  = bilinear(grid, merged_shape) anyres_max_N only, when the map exceeds 1.1x N tiles of tokens
    grid  = cat(grid, image_newline per row, dim=width) -> [rows * (cols + 1), D]
    out   = cat(base, grid)

A sample with several images uses one `pad` tile per image (LLaVA-NeXT's training code overrides the aspect for
multi-image samples): its features are the tile's followed by one `image_newline` (the reference's single-tile
branch). The token counts are `AnyRes.image_tokens` (and `side*side + 1`), which the data side uses to plan
lengths without the model.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from llava_sft.data.anyres import AnyRes


def merge_tiles(features: torch.Tensor, size: tuple[int, int], layout: AnyRes,
                newline: torch.Tensor) -> torch.Tensor:
    """[1 + gh*gw, side^2, D] projected tile features of an image of `size` = (width, height) -> [tokens, D]."""
    side = layout.side
    gw, gh = layout.grid(size)
    n, p, d = features.shape
    if n != 1 + gw * gh or p != side * side:
        raise ValueError(f"image of size {size}: expected {1 + gw * gh} tiles of {side * side} tokens, got {n} of {p}")
    base, grid = features[0], features[1:]
    grid = grid.view(gh, gw, side, side, d).permute(4, 0, 2, 1, 3).reshape(d, gh * side, gw * side)
    top, left, rows, cols = layout.unpadded(size)
    grid = grid[:, top:top + rows, left:left + cols]
    merged = layout.merged_shape(size)
    if merged != (rows, cols):
        grid = F.interpolate(grid[None], list(merged), mode="bilinear")[0]
    rows, cols = merged
    grid = torch.cat((grid, newline.to(grid.dtype)[:, None, None].expand(d, rows, 1)), dim=-1)
    return torch.cat((base, grid.flatten(1, 2).transpose(0, 1)), dim=0)


def single_tile(features: torch.Tensor, newline: torch.Tensor) -> torch.Tensor:
    """[1, side^2, D] -> [side^2 + 1, D]: a multi-image sample's image (one `pad` tile) and one newline."""
    return torch.cat((features[0], newline.to(features.dtype)[None]), dim=0)
