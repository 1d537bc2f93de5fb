"""AnyRes (LLaVA-1.6 dynamic high resolution) and LLaVA-OneVision's anyres_max_N: tiles, token counts and the
feature merge, exact to the reference (haotian-liu/LLaVA mm_utils.py + llava_arch.py; LLaVA-NeXT llava_arch.py for
the interpolation) and, with its two documented differences, to transformers' LlavaNext."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from llava_sft.data.anyres import (
    LLAVA_NEXT_PINPOINTS,
    AnyRes,
    grid_pinpoints,
    parse_aspect,
    select_best_resolution,
    tile_images,
)
from llava_sft.model.anyres import merge_tiles, single_tile
from tests.reference_llava import reference_process_anyres_image, reference_spatial_unpad

pytestmark = pytest.mark.latest_stack  # passes on constraints/latest.txt too (CI runs it there)

NEXT = AnyRes(tile=336, side=24, pinpoints=LLAVA_NEXT_PINPOINTS)
SIZES = [(640, 480), (1920, 1080), (672, 672), (336, 336), (300, 200), (704, 396), (200, 300), (1000, 333),
         (333, 1000), (1, 1), (5000, 40), (40, 5000), (1023, 767), (512, 512), (1280, 720), (720, 1280)]


@pytest.mark.parametrize("size,reference,hf", [((640, 480), 2340, 2340), ((1920, 1080), 1948, 1948),
                                               ((672, 672), 2928, 2928), ((336, 336), 1176, 1176),
                                               ((704, 396), 1850, 1948)])
def test_tokens_per_image_are_the_references_and_transformers_rounding_is_an_option(size, reference, hf):
    """576 + rows * (cols + 1), counted by hand from the reference's code (issue 40 lists them): 704x396 keeps 26
    rows in the reference (int(26.99999...)) and 28 in transformers (round -> 27, padding (48 - 27) // 2 = 10)."""
    assert NEXT.image_tokens(size) == reference
    assert AnyRes(336, 24, LLAVA_NEXT_PINPOINTS, unpad_rounding="hf").image_tokens(size) == hf


def test_pinpoints_are_width_height_and_ties_keep_the_earlier_entry():
    """300x200 fits [336, 672] and [672, 336] alike (effective 336*224 either way, same waste): the reference keeps
    the first, [336 wide, 672 high] -- 1 column, 2 rows, 976 tokens; transformers reads the pairs as (height, width)
    and picks 2 columns (1464 tokens) unless the exported list is transposed."""
    assert select_best_resolution((300, 200), LLAVA_NEXT_PINPOINTS) == (336, 672)
    assert NEXT.grid((300, 200)) == (1, 2) and NEXT.image_tokens((300, 200)) == 976
    assert select_best_resolution((1000, 333), LLAVA_NEXT_PINPOINTS) == (1008, 336)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_with_hf_rounding_and_transposed_pinpoints_the_counts_are_transformers(size):
    """transformers' own functions (LlavaNext modeling: grid shape, unpad_image) as the oracle."""
    from transformers.image_processing_utils import select_best_resolution as hf_select
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    transposed = [[h, w] for w, h in LLAVA_NEXT_PINPOINTS]  # what the export writes
    w, h = size
    assert hf_select((h, w), transposed) == select_best_resolution(size, LLAVA_NEXT_PINPOINTS)[::-1]
    rows, cols = get_anyres_image_grid_shape((h, w), transposed, 336)
    unpadded = unpad_image(torch.zeros(1, rows * 24, cols * 24), (h, w))
    hf = AnyRes(336, 24, LLAVA_NEXT_PINPOINTS, unpad_rounding="hf")
    assert hf.image_tokens(size) == 576 + unpadded.shape[1] * (unpadded.shape[2] + 1)


def test_tiles_are_a_squashed_base_and_the_padded_grid_row_major():
    """A 640x480 image of two colours (left half red, right half blue): best fit 672x672, resized to 672x504
    (ceil(480 * 1.05)), pasted 84 rows down on black; tiles row-major, each 336 px; the base is a squash."""
    array = np.zeros((480, 640, 3), dtype=np.uint8)
    array[:, :320] = (255, 0, 0)
    array[:, 320:] = (0, 0, 255)
    tiles = tile_images(Image.fromarray(array), LLAVA_NEXT_PINPOINTS, 336)
    assert len(tiles) == 5 and all(t.size == (336, 336) for t in tiles)
    base, top_left, top_right, bottom_left, bottom_right = (np.asarray(t).astype(int) for t in tiles)
    assert (base[:, :160] == (255, 0, 0)).all() and (base[:, 176:] == (0, 0, 255)).all()  # squashed, no padding
    assert (top_left[:84] == 0).all() and (top_right[:84] == 0).all()  # black above the image
    assert (top_left[85:, :330] == (255, 0, 0)).all() and (top_right[85:, 6:] == (0, 0, 255)).all()
    assert (bottom_left[:251, :330] == (255, 0, 0)).all() and (bottom_left[253:] == 0).all()  # 84 + 504 = 588
    assert (bottom_right[253:] == 0).all()


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_the_feature_merge_is_the_references(size):
    torch.manual_seed(0)
    layout = AnyRes(tile=48, side=3, pinpoints=tuple((w // 7, h // 7) for w, h in LLAVA_NEXT_PINPOINTS))
    feats = torch.randn(layout.num_tiles(size), 9, 5)
    newline = torch.randn(5)
    ours = merge_tiles(feats, size, layout, newline)
    ref = reference_spatial_unpad(feats, layout.grid(size), 3, newline, size)
    assert ours.shape == (layout.image_tokens(size), 5)
    assert torch.equal(ours, ref)
    assert torch.equal(single_tile(feats[:1], newline), torch.cat((feats[0], newline[None])))


@pytest.mark.parametrize("size", [(2304, 2304), (3000, 1000), (800, 600), (384, 384), (5000, 100)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
def test_anyres_max_9_interpolates_as_llava_next_does(size):
    """OneVision: SigLIP 384 px tiles of 27 x 27 tokens, grids (1x1)..(6x6); a 2304-px square uses 6 x 6 tiles,
    a 162 x 162 map, ratio sqrt(162^2 / (9 * 27^2)) = 2 -> 81 x 81: 729 + 81 * 82 = 7371 tokens."""
    pinpoints = grid_pinpoints("(1x1),...,(6x6)", 384)
    assert len(pinpoints) == 36 and pinpoints[:2] == [(384, 384), (384, 768)] and pinpoints[-1] == (2304, 2304)
    assert parse_aspect("anyres_max_9") == 9 and parse_aspect("anyres") is None
    layout = AnyRes(tile=384, side=27, pinpoints=tuple(pinpoints), max_tiles=9)
    if size == (2304, 2304):
        assert layout.image_tokens(size) == 7371
    torch.manual_seed(1)
    feats = torch.randn(layout.num_tiles(size), 27 * 27, 4)
    newline = torch.randn(4)
    ours = merge_tiles(feats, size, layout, newline)
    ref = reference_spatial_unpad(feats, layout.grid(size), 27, newline, size, max_num_patches=9)
    assert ours.shape == (layout.image_tokens(size), 4) and torch.equal(ours, ref)


def test_bad_settings_are_refused_by_name():
    with pytest.raises(ValueError, match="anyres_max_N"):
        parse_aspect("anyres_max_0")
    with pytest.raises(ValueError, match="multiples of the tile size 336"):
        grid_pinpoints([[336, 600]], 336)
    with pytest.raises(ValueError, match="unpad_rounding"):
        AnyRes(336, 24, LLAVA_NEXT_PINPOINTS, unpad_rounding="round")


@pytest.mark.parametrize("size", SIZES + [(2000, 3000), (336, 2), (2, 336), (672, 336), (1008, 336)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
def test_grid_and_tile_pixels_are_the_reference_functions(size):
    """Against a transcription of mm_utils.process_anyres_image's PIL steps (PIL's default resampling, as the
    reference calls it): the same grid and byte-identical tiles, ties, extreme aspect ratios, 1x1 and 2000x3000."""
    rng = np.random.default_rng(size[0] * 7919 + size[1])
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    ref_tiles, best = reference_process_anyres_image(image, [list(p) for p in LLAVA_NEXT_PINPOINTS], 336)
    ours = tile_images(image, LLAVA_NEXT_PINPOINTS, 336)
    assert select_best_resolution(size, LLAVA_NEXT_PINPOINTS) == best
    assert len(ours) == len(ref_tiles) == NEXT.num_tiles(size)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(ours, ref_tiles, strict=True))
