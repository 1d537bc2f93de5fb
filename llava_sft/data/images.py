"""Image preprocessing, identical at training and inference (the settings are saved with the model).

`square`: resize the shortest side to `size` (bicubic) then centre-crop `size` x `size`, as
CLIPImageProcessor does. `pad` (LLaVA-1.5): paste the image centred on a square canvas filled
with the mean colour (`int(mean * 255)` per channel), then the same resize + crop. Then
rescale to [0, 1] and normalise with the encoder's mean/std. `anyres` / `anyres_max_N` (LLaVA-NeXT, data/anyres.py):
a squashed base view and the tiles of the best-fitting grid, each normalised the same way; an image of a sample
with several images is one `pad` view (LLaVA-NeXT `llava/train/train.py`: `process_image(f, "pad")` when
`len(image_file) > 1`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from llava_sft.data.anyres import AnyRes, is_anyres, parse_aspect, tile_images


@dataclass(frozen=True)
class ImageProcessor:
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    aspect: str = "pad"  # "pad", "square", "anyres", "anyres_max_N"
    anyres: AnyRes | None = None  # the layout, for the AnyRes aspects

    def __post_init__(self):
        if self.aspect not in ("pad", "square") and not is_anyres(self.aspect):
            raise ValueError(f"image aspect must be 'pad', 'square', 'anyres' or 'anyres_max_N', got {self.aspect!r}")
        if is_anyres(self.aspect) and (self.anyres is None or self.anyres.tile != self.size):
            raise ValueError(f"image aspect {self.aspect!r} needs its AnyRes layout, with tiles of {self.size} px")

    @classmethod
    def from_saved(cls, image_cfg: dict) -> "ImageProcessor":
        anyres = None
        if is_anyres(image_cfg["aspect"]):
            anyres = AnyRes(image_cfg["size"], image_cfg["side"], tuple(tuple(p) for p in image_cfg["pinpoints"]),
                            parse_aspect(image_cfg["aspect"]), image_cfg.get("unpad_rounding", "reference"))
        return cls(image_cfg["size"], tuple(image_cfg["mean"]), tuple(image_cfg["std"]), image_cfg["aspect"], anyres)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.process(image)[0]

    def process(self, image: Image.Image) -> tuple[torch.Tensor, bool]:
        """(pixels, whether the image needed more than a plain RGB conversion: see `to_rgb`). AnyRes: the `pad`
        view (one image of several in a sample)."""
        image, converted = to_rgb(image, tuple(int(m * 255) for m in self.mean))
        if self.aspect != "square":
            image = expand_to_square(image, tuple(int(m * 255) for m in self.mean))
        return self._normalize(center_crop(resize_shortest_side(image, self.size), self.size)), converted

    def tiles(self, image: Image.Image, alone: bool = True) -> tuple[torch.Tensor, tuple[int, int] | None, bool]:
        """(pixels [k, 3, size, size], the image's (width, height) when it was tiled else None, converted).
        `pad` / `square`: k = 1. AnyRes: the base view and the grid's tiles (k = 1 + columns x rows); an image
        not `alone` in its sample gets the one `pad` view."""
        if self.anyres is None or not alone:
            pixels, converted = self.process(image)
            return pixels[None], None, converted
        image, converted = to_rgb(image, tuple(int(m * 255) for m in self.mean))
        views = tile_images(image, self.anyres.pinpoints, self.size)
        return torch.stack([self._normalize(v) for v in views]), image.size, converted

    def _normalize(self, image: Image.Image) -> torch.Tensor:
        array = np.asarray(image, dtype=np.float32) / 255.0
        array = (array - np.array(self.mean, dtype=np.float32)) / np.array(self.std, dtype=np.float32)
        return torch.from_numpy(array.transpose(2, 0, 1).copy())

    def blank(self) -> torch.Tensor:
        """A mid-grey image at the mean colour, normalised (all zeros)."""
        return torch.zeros(3, self.size, self.size)


def to_rgb(image: Image.Image, fill: tuple[int, int, int]) -> tuple[Image.Image, bool]:
    """8-bit RGB, faithfully: 16-bit and 32-bit integer images (PIL modes I;16*, I) are scaled to 8 bits (PIL's
    convert('RGB') clips them, so a 16-bit grayscale PNG came out pure white); float images (F) are scaled from
    [0, 1] when they lie there, else clipped; an alpha channel (RGBA, LA, PA, P with transparency) is composited on
    the fill colour (the padding colour) instead of dropped, which would reveal whatever colour the transparent
    pixels happen to store. -> (image, converted: anything beyond a plain mode change)."""
    mode = image.mode
    if mode.startswith("I") or mode == "F":
        array = np.asarray(image, dtype=np.float64)
        if mode == "F":
            scaled = array * 255.0 if array.size and 0.0 <= array.min() and array.max() <= 1.0 else array
        else:  # I;16 / I;16B / I;16L and 32-bit I (how PIL opens most 16-bit PNGs): 0..65535
            scaled = array / 257.0
        gray = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")
        return gray.convert("RGB"), True
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*fill, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB"), True
    return image.convert("RGB"), False


def expand_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def resize_shortest_side(image: Image.Image, size: int) -> Image.Image:
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) == (w, h):
        return image
    return image.resize((new_w, new_h), Image.Resampling.BICUBIC)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))
