"""Image preprocessing, identical at training and inference (the settings are saved with the model).

`square`: resize the shortest side to `size` (bicubic) then centre-crop `size` x `size`, as
CLIPImageProcessor does. `pad` (LLaVA-1.5): paste the image centred on a square canvas filled
with the mean colour (`int(mean * 255)` per channel), then the same resize + crop. Then
rescale to [0, 1] and normalise with the encoder's mean/std.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True)
class ImageProcessor:
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    aspect: str = "pad"  # "pad" or "square"

    def __post_init__(self):
        if self.aspect not in ("pad", "square"):
            raise ValueError(f"image aspect must be 'pad' or 'square', got {self.aspect!r}")

    @classmethod
    def from_saved(cls, image_cfg: dict) -> "ImageProcessor":
        return cls(image_cfg["size"], tuple(image_cfg["mean"]), tuple(image_cfg["std"]), image_cfg["aspect"])

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.process(image)[0]

    def process(self, image: Image.Image) -> tuple[torch.Tensor, bool]:
        """(pixels, whether the image needed more than a plain RGB conversion: see `to_rgb`)."""
        image, converted = to_rgb(image, tuple(int(m * 255) for m in self.mean))
        if self.aspect == "pad":
            image = expand_to_square(image, tuple(int(m * 255) for m in self.mean))
        image = resize_shortest_side(image, self.size)
        image = center_crop(image, self.size)
        array = np.asarray(image, dtype=np.float32) / 255.0
        array = (array - np.array(self.mean, dtype=np.float32)) / np.array(self.std, dtype=np.float32)
        return torch.from_numpy(array.transpose(2, 0, 1).copy()), converted

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
