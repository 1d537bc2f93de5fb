"""Dynamic high resolution (LLaVA-NeXT's AnyRes, LLaVA-OneVision's `anyres_max_N`): the image side.

An image of size (w, h) becomes a base view and a grid of tiles at the vision tower's resolution `tile`
(336 px for LLaVA-1.6's CLIP ViT-L/14-336, 384 for OneVision's SigLIP). Exact to the reference,
haotian-liu/LLaVA `llava/mm_utils.py` (LLaVA-NeXT's is the same code):

* `select_best_resolution`: the pinpoints, read as **(width, height)**, in list order; for each, the scale
  `s = min(W/w, H/h)`, effective pixels `min(int(w*s) * int(h*s), w*h)`, waste `W*H - effective`; a candidate
  wins only with strictly more effective pixels, or as many and strictly less waste (ties keep the earlier one).
* `resize_and_pad`: fit into (W, H) -- the long side exactly, the other `min(ceil(side * scale), limit)` --
  bicubic, pasted centred on **black**; `divide_to_tiles` cuts it row-major into `tile` x `tile` crops.
* the base view is `image.resize((tile, tile))`: a squash, not a pad.

The feature side (model/anyres.py) needs only the grid and the unpadded feature map's shape, computed here from
the size alone, so that the start-up check, packing and the length policy count an image's tokens from its
header without decoding it (`image_tokens`):

    tokens = side^2 (base) + rows * (cols + 1)    (a learned `image_newline` after every row)

where `side` = tile / patch (24 for 336/14), the grid's feature map is (gh*side) x (gw*side), and `unpad` removes
the rows (or columns) that show the black padding: `new = int(h * (W_map / w))` in the reference (truncation),
`int(round(h * (W_map / w), 7))` in transformers' LlavaNext (`unpad_rounding: hf`); kept: `map - 2 * ((map - new)
// 2)`. `anyres_max_N` (LLaVA-NeXT `llava_arch.py`) then shrinks a map of more than 1.1x N tiles' worth of tokens
bilinearly to `(int(rows // r), int(cols // r))`, r = sqrt(rows * cols / (N * side^2)).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from PIL import Image

# LLaVA-1.6's pinpoints (the released llava-v1.6 checkpoints' config.json `image_grid_pinpoints`), (width, height)
LLAVA_NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
LLAVA_NEXT_GRIDS = tuple((w // 336, h // 336) for w, h in LLAVA_NEXT_PINPOINTS)  # in tiles: any tower's default
UNPAD_ROUNDING = ("reference", "hf")


def parse_aspect(aspect: str) -> int | None:
    """'anyres' -> None (no token cap), 'anyres_max_9' -> 9; anything else is not AnyRes (ValueError)."""
    if aspect == "anyres":
        return None
    match = re.fullmatch(r"anyres_max_(\d+)", aspect)
    if not match or int(match.group(1)) < 1:
        raise ValueError(f"not an AnyRes image aspect: {aspect!r} (anyres, or anyres_max_N with N >= 1)")
    return int(match.group(1))


def is_anyres(aspect: str) -> bool:
    return aspect == "anyres" or aspect.startswith("anyres_max_")


def grid_pinpoints(spec, tile: int) -> list[tuple[int, int]]:
    """Pinpoints as (width, height) pixel pairs: a list of pairs, or LLaVA-NeXT's range string "(1x1),...,(6x6)"
    (every grid from the first to the last, in tiles, times `tile`: OneVision's `anyres_max_9` uses it)."""
    if isinstance(spec, str):
        found = re.findall(r"\((\d+)x(\d+)\)", spec)
        if not found:
            raise ValueError(f"image_grid_pinpoints {spec!r}: expected a list of [width, height] or '(1x1),...,(6x6)'")
        (a0, b0), (a1, b1) = map(int, found[0]), map(int, found[-1])
        return [(i * tile, j * tile) for i in range(a0, a1 + 1) for j in range(b0, b1 + 1)]
    pairs = [tuple(int(v) for v in pair) for pair in spec]
    if not pairs or any(len(p) != 2 or p[0] % tile or p[1] % tile or min(p) <= 0 for p in pairs):
        raise ValueError(f"image_grid_pinpoints {spec!r}: each must be [width, height], positive multiples of the "
                         f"tile size {tile}")
    return pairs


def select_best_resolution(size: tuple[int, int], pinpoints) -> tuple[int, int]:
    """(width, height) of the pinpoint the reference picks for an image of `size` = (width, height)."""
    w, h = size
    best, best_effective, best_waste = None, 0, float("inf")
    for width, height in pinpoints:
        scale = min(width / w, height / h)
        effective = min(int(w * scale) * int(h * scale), w * h)
        waste = width * height - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (width, height), effective, waste
    return best


def resize_and_pad(image: Image.Image, target: tuple[int, int]) -> Image.Image:
    w, h = image.size
    tw, th = target
    scale_w, scale_h = tw / w, th / h
    if scale_w < scale_h:
        nw, nh = tw, min(math.ceil(h * scale_w), th)
    else:
        nw, nh = min(math.ceil(w * scale_h), tw), th
    resized = image.resize((nw, nh), Image.Resampling.BICUBIC)  # PIL's default for RGB, as the reference calls it
    canvas = Image.new("RGB", (tw, th), (0, 0, 0))
    canvas.paste(resized, ((tw - nw) // 2, (th - nh) // 2))
    return canvas


def divide_to_tiles(image: Image.Image, tile: int) -> list[Image.Image]:
    w, h = image.size
    return [image.crop((x, y, x + tile, y + tile)) for y in range(0, h, tile) for x in range(0, w, tile)]


def tile_images(image: Image.Image, pinpoints, tile: int) -> list[Image.Image]:
    """[base view, grid tiles row-major] for an RGB image."""
    best = select_best_resolution(image.size, pinpoints)
    base = image.resize((tile, tile), Image.Resampling.BICUBIC)
    return [base] + divide_to_tiles(resize_and_pad(image, best), tile)


@dataclass(frozen=True)
class AnyRes:
    """What an AnyRes model needs to turn an image size into tiles and tokens (saved with the model)."""

    tile: int  # the tower's input size (336)
    side: int  # feature tokens per tile side (24 = 336 / 14, CLS dropped)
    pinpoints: tuple[tuple[int, int], ...]  # (width, height)
    max_tiles: int | None = None  # anyres_max_N
    unpad_rounding: str = "reference"

    def __post_init__(self):
        if self.unpad_rounding not in UNPAD_ROUNDING:
            raise ValueError(f"unpad_rounding must be one of {UNPAD_ROUNDING}, got {self.unpad_rounding!r}")

    def grid(self, size: tuple[int, int]) -> tuple[int, int]:
        """(columns, rows) of tiles for an image of `size` = (width, height)."""
        width, height = select_best_resolution(size, self.pinpoints)
        return width // self.tile, height // self.tile

    def num_tiles(self, size: tuple[int, int]) -> int:
        gw, gh = self.grid(size)
        return 1 + gw * gh

    def unpadded(self, size: tuple[int, int]) -> tuple[int, int, int, int]:
        """(top, left, rows, cols): the part of the grid's feature map that shows the image, not the padding."""
        w, h = size
        gw, gh = self.grid(size)
        map_h, map_w = gh * self.side, gw * self.side
        if w / h > map_w / map_h:  # padding above and below
            scaled = h * (map_w / w)
            new = int(round(scaled, 7)) if self.unpad_rounding == "hf" else int(scaled)
            pad = (map_h - new) // 2
            return pad, 0, map_h - 2 * pad, map_w
        scaled = w * (map_h / h)
        new = int(round(scaled, 7)) if self.unpad_rounding == "hf" else int(scaled)
        pad = (map_w - new) // 2
        return 0, pad, map_h, map_w - 2 * pad

    def merged_shape(self, size: tuple[int, int]) -> tuple[int, int]:
        """(rows, cols) of the feature map that gets the newlines (after `anyres_max_N`'s interpolation)."""
        _, _, rows, cols = self.unpadded(size)
        if self.max_tiles is not None:
            ratio = math.sqrt(rows * cols / (self.max_tiles * self.side ** 2))
            if ratio > 1.1:
                return int(rows // ratio), int(cols // ratio)
        return rows, cols

    def image_tokens(self, size: tuple[int, int]) -> int:
        rows, cols = self.merged_shape(size)
        return self.side ** 2 + rows * (cols + 1)


def image_token_counts(sizes: list, tokens_per_image: int, layout: AnyRes | None) -> list[int]:
    """Feature tokens of each image of a sample: `tokens_per_image` each without AnyRes; with it, from each image's
    (width, height), or `side^2 + 1` for an image given one `pad` view (size None: several images in a sample)."""
    if layout is None:
        return [tokens_per_image] * len(sizes)
    return [layout.side ** 2 + 1 if size is None else layout.image_tokens(tuple(size)) for size in sizes]


def layout_for(aspect: str, tile: int, side: int, pinpoints=None, unpad_rounding: str = "reference") -> AnyRes | None:
    """The AnyRes layout of an image aspect (None for `pad` / `square`): `pinpoints` as in the config
    (`model.image_grid_pinpoints`), default LLaVA-1.6's grids at this tower's tile size."""
    if not is_anyres(aspect):
        return None
    spec = pinpoints or [[w * tile, h * tile] for w, h in LLAVA_NEXT_GRIDS]
    return AnyRes(tile, side, tuple(grid_pinpoints(spec, tile)), parse_aspect(aspect), unpad_rounding)
