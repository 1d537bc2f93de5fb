"""Image preprocessing: `square` matches CLIPImageProcessor, `pad` centres the image on a mean-colour canvas."""
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

if int(transformers.__version__.split(".")[0]) >= 5:  # the PIL backend: LLaVA's CLIPImageProcessor was PIL-based
    from transformers import CLIPImageProcessorPil as CLIPImageProcessor
else:
    from transformers import CLIPImageProcessor

from llava_sft.data.images import ImageProcessor

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def random_image(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("size", [(50, 30), (30, 50), (33, 33), (64, 17)])
def test_square_matches_hf_clip_image_processor(size):
    hf = CLIPImageProcessor(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24},
                            image_mean=list(MEAN), image_std=list(STD))
    image = random_image(*size)
    ours = ImageProcessor(24, MEAN, STD, "square")(image)
    theirs = torch.from_numpy(hf(image, return_tensors="np")["pixel_values"][0])
    assert ours.shape == (3, 24, 24)
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_pad_puts_the_image_on_a_mean_colour_canvas():
    red = Image.new("RGB", (40, 20), (255, 0, 0))
    pixels = ImageProcessor(20, MEAN, STD, "pad")(red)
    # 40x20 -> 40x40 canvas, image in rows 10..29 -> resized to 20x20: rows 5..14 red, rows 0..4 / 15..19 canvas
    canvas = (torch.tensor([int(m * 255) / 255 for m in MEAN]) - torch.tensor(MEAN)) / torch.tensor(STD)
    red_norm = (torch.tensor([1.0, 0.0, 0.0]) - torch.tensor(MEAN)) / torch.tensor(STD)
    assert torch.allclose(pixels[:, 0, 10], canvas, atol=1e-4) and torch.allclose(pixels[:, 19, 10], canvas, atol=1e-4)
    assert torch.allclose(pixels[:, 10, 10], red_norm, atol=1e-4)
    # `square` would instead crop the middle of the red image: no canvas at all
    assert torch.allclose(ImageProcessor(20, MEAN, STD, "square")(red)[:, 0, 10], red_norm, atol=1e-4)


def test_unknown_aspect_is_an_error():
    with pytest.raises(ValueError, match="'pad', 'square', 'anyres' or 'anyres_max_N'"):
        ImageProcessor(20, MEAN, STD, "stretch")
