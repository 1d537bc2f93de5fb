"""Test oracle: a faithful re-implementation of the reference LLaVA-1.5 preprocessing.

This mirrors, step by step and quirks included, what the original LLaVA training
code (``llava/train/train.py`` + ``llava/mm_utils.py`` + ``conv_vicuna_v1`` /
``conv_llava_plain``) does to one LLaVA record, in the variant written for
``tokenizers < 0.14`` (no ``legacy`` length adjustment):

* :func:`tokenizer_image_token` -- tokenize around ``<image>`` and splice in
  ``IMAGE_TOKEN_INDEX`` (-200), keeping a single leading BOS.
* :func:`preprocess_multimodal` -- move ``<image>`` to the start of its turn.
* :func:`render_vicuna_v1` -- ``SeparatorStyle.TWO`` prompt rendering.
* :func:`preprocess_v1` -- the length-offset masking of ``preprocess_v1``.
* :func:`preprocess_plain` -- Stage-1 ``"<image>" + caption + "\\n"``.

It is written from the reference's algorithm, is independent of
``llava_sft.data`` and is used only to check our implementation against it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

IGNORE_INDEX = -100
IMAGE_TOKEN_INDEX = -200
DEFAULT_IMAGE_TOKEN = "<image>"

VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
VICUNA_V1_ROLES = ("USER", "ASSISTANT")
VICUNA_V1_SEP, VICUNA_V1_SEP2 = " ", "</s>"
PLAIN_SEP = "\n"  # conv_llava_plain.sep


@dataclass
class ReferenceResult:
    """What the reference produces for one sample, plus diagnostics for tests."""

    input_ids: list[int]
    labels: list[int]
    conversation: str  # the rendered prompt text that was tokenized
    mismatch: bool  # True when preprocess_v1 hit its "tokenization mismatch" branch


def tokenizer_image_token(prompt: str, tokenizer, image_token_index: int = IMAGE_TOKEN_INDEX) -> list[int]:
    """``llava.mm_utils.tokenizer_image_token``: tokenize each chunk between
    ``<image>`` markers separately (each with its own BOS), drop those BOS ids but
    keep the first one, and join the chunks with ``image_token_index``."""
    prompt_chunks = [tokenizer(chunk).input_ids for chunk in prompt.split(DEFAULT_IMAGE_TOKEN)]

    def insert_separator(chunks, sep):
        return [ele for sublist in zip(chunks, [sep] * len(chunks), strict=True) for ele in sublist][:-1]

    input_ids: list[int] = []
    offset = 0
    if len(prompt_chunks) > 0 and len(prompt_chunks[0]) > 0 and prompt_chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(prompt_chunks[0][0])
    # The separator is [image] * (offset + 1) so that x[offset:] leaves exactly one image id.
    for x in insert_separator(prompt_chunks, [image_token_index] * (offset + 1)):
        input_ids.extend(x[offset:])
    return input_ids


def preprocess_multimodal(sources: list[list[dict]]) -> list[list[dict]]:
    """``preprocess_multimodal`` (is_multimodal, no im_start/end, not mmtag): every
    turn containing ``<image>`` becomes ``"<image>\\n" + rest.strip()``.  In place."""
    for source in sources:
        for sentence in source:
            if DEFAULT_IMAGE_TOKEN in sentence["value"]:
                sentence["value"] = sentence["value"].replace(DEFAULT_IMAGE_TOKEN, "").strip()
                sentence["value"] = DEFAULT_IMAGE_TOKEN + "\n" + sentence["value"]
                sentence["value"] = sentence["value"].strip()
            # replace_token == DEFAULT_IMAGE_TOKEN (mm_use_im_start_end=False): a no-op replace.
            sentence["value"] = sentence["value"].replace(DEFAULT_IMAGE_TOKEN, DEFAULT_IMAGE_TOKEN)
    return sources


def render_vicuna_v1(source: list[dict]) -> str:
    """``Conversation.get_prompt`` for ``conv_vicuna_v1`` (``SeparatorStyle.TWO``),
    with the role mapping and first-turn skipping of ``preprocess_v1``."""
    roles = {"human": VICUNA_V1_ROLES[0], "gpt": VICUNA_V1_ROLES[1]}
    if roles[source[0]["from"]] != VICUNA_V1_ROLES[0]:
        source = source[1:]  # skip a leading non-human turn
    messages = []
    for j, sentence in enumerate(source):
        role = roles[sentence["from"]]
        assert role == VICUNA_V1_ROLES[j % 2], "roles must alternate, human first"
        messages.append((role, sentence["value"]))

    seps = [VICUNA_V1_SEP, VICUNA_V1_SEP2]
    ret = VICUNA_V1_SYSTEM + seps[0]
    for i, (role, message) in enumerate(messages):
        if message:
            ret += role + ": " + message + seps[i % 2]
        else:
            ret += role + ":"
    return ret


def preprocess_v1(source: list[dict], tokenizer, has_image: bool, model_max_length: int | None = None) -> ReferenceResult:
    """``preprocess_v1`` for one (already multimodal-preprocessed) conversation.

    Labels are computed by length offsets: each ``"</s>"``-terminated round is
    re-tokenized on its own, its length (which includes a BOS standing in for the
    round's ``</s>``) advances ``cur_len``, and the first ``len(instruction) - 2``
    tokens of it (BOS and the trailing ``"▁"`` of ``"ASSISTANT: "`` excluded) are
    masked.  If the offsets do not add up to the real length, everything is masked.
    """
    conversation = render_vicuna_v1(source)
    if has_image:
        input_ids = tokenizer_image_token(conversation, tokenizer)
    else:
        kwargs = {} if model_max_length is None else {"max_length": model_max_length, "truncation": True}
        input_ids = tokenizer(conversation, **kwargs).input_ids
    target = list(input_ids)

    sep = VICUNA_V1_SEP + VICUNA_V1_ROLES[1] + ": "
    total_len = sum(1 for t in target if t != tokenizer.pad_token_id)
    rounds = conversation.split(VICUNA_V1_SEP2)
    cur_len = 1
    target[:cur_len] = [IGNORE_INDEX] * cur_len
    for rou in rounds:
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        if has_image:
            round_len = len(tokenizer_image_token(rou, tokenizer))
            instruction_len = len(tokenizer_image_token(parts[0], tokenizer)) - 2
        else:
            round_len = len(tokenizer(rou).input_ids)
            instruction_len = len(tokenizer(parts[0]).input_ids) - 2
        # Slice assignment on a tensor never grows it; emulate that on a list.
        _fill(target, cur_len, cur_len + instruction_len)
        cur_len += round_len
    _fill(target, cur_len, len(target))

    mismatch = False
    if model_max_length is None or cur_len < model_max_length:
        if cur_len != total_len:
            target = [IGNORE_INDEX] * len(target)
            mismatch = True
    return ReferenceResult(list(input_ids), target, conversation, mismatch)


def preprocess_plain(source: list[dict], tokenizer) -> ReferenceResult:
    """``preprocess_plain``: the human turn is replaced by just ``<image>``; the
    text is ``"<image>" + caption + "\\n"`` and the tokens of ``"<image>"``
    (BOS and the image id) are masked."""
    assert len(source) == 2
    assert DEFAULT_IMAGE_TOKEN in source[0]["value"]
    source[0]["value"] = DEFAULT_IMAGE_TOKEN
    conversation = source[0]["value"] + source[1]["value"] + PLAIN_SEP
    input_ids = tokenizer_image_token(conversation, tokenizer)
    target = list(input_ids)
    tokenized_len = len(tokenizer_image_token(source[0]["value"], tokenizer))
    _fill(target, 0, tokenized_len)
    return ReferenceResult(input_ids, target, conversation, False)


def reference_preprocess_detailed(sample: dict, tokenizer, template: str, model_max_length: int | None = None) -> ReferenceResult:
    """Run the reference pipeline of ``LazySupervisedDataset.__getitem__`` on one
    LLaVA record (``{"id", "image"?, "conversations": [...]}``)."""
    has_image = "image" in sample
    sources = copy.deepcopy([sample["conversations"]])
    if has_image:
        sources = preprocess_multimodal(sources)
    if template == "plain":
        return preprocess_plain(sources[0], tokenizer)
    if template == "vicuna_v1":
        return preprocess_v1(sources[0], tokenizer, has_image, model_max_length)
    raise ValueError(f"reference oracle supports 'plain' and 'vicuna_v1', not {template!r}")


def reference_preprocess(sample: dict, tokenizer, template: str) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` as the reference LLaVA-1.5 code computes them."""
    result = reference_preprocess_detailed(sample, tokenizer, template)
    return result.input_ids, result.labels


def _fill(target: list[int], start: int, stop: int) -> None:
    """``target[start:stop] = IGNORE_INDEX`` with tensor semantics (clipped, never resized)."""
    start, stop = max(0, min(start, len(target))), max(0, min(stop, len(target)))
    for k in range(start, stop):
        target[k] = IGNORE_INDEX


# ----------------------------------------------------------------------------- AnyRes (LLaVA-1.6)
def reference_unpad_image(tensor, original_size):
    """llava_arch.unpad_image: [C, H, W] feature map of a padded image of original (width, height)."""
    original_width, original_height = original_size
    current_height, current_width = tensor.shape[1:]
    if original_width / original_height > current_width / current_height:
        new_height = int(original_height * (current_width / original_width))
        padding = (current_height - new_height) // 2
        return tensor[:, padding:current_height - padding, :]
    new_width = int(original_width * (current_height / original_height))
    padding = (current_width - new_width) // 2
    return tensor[:, :, padding:current_width - padding]


def reference_spatial_unpad(image_feature, grid, side, newline, image_size, max_num_patches=None):
    """prepare_inputs_labels_for_multimodal's `spatial_unpad` branch for one image (LLaVA-NeXT's anyres_max_N
    interpolation when `max_num_patches`): [1 + gh*gw, side*side, D] -> [tokens, D]. `grid` = (gw, gh)."""
    import math

    import torch

    num_patch_width, num_patch_height = grid
    base_image_feature = image_feature[0]
    image_feature = image_feature[1:].view(num_patch_height, num_patch_width, side, side, -1)
    image_feature = image_feature.permute(4, 0, 2, 1, 3).contiguous()
    image_feature = image_feature.flatten(1, 2).flatten(2, 3)
    image_feature = reference_unpad_image(image_feature, image_size)
    if max_num_patches is not None:
        c, h, w = image_feature.shape
        times = math.sqrt(h * w / (max_num_patches * side ** 2))
        if times > 1.1:
            image_feature = torch.nn.functional.interpolate(image_feature[None], [int(h // times), int(w // times)],
                                                            mode="bilinear")[0]
    image_feature = torch.cat((image_feature, newline[:, None, None].expand(*image_feature.shape[:-1], 1)), dim=-1)
    image_feature = image_feature.flatten(1, 2).transpose(0, 1)
    return torch.cat((base_image_feature, image_feature), dim=0)


def reference_process_anyres_image(image, grid_pinpoints, crop_size):
    """mm_utils.process_anyres_image's PIL steps (before the CLIP processor's per-tile normalisation, a no-op resize
    and crop at this size): select_best_resolution, resize_and_pad_image, divide_to_patches, the squashed base."""
    import math

    from PIL import Image

    original_width, original_height = image.size
    best_fit, max_effective, min_wasted = None, 0, float("inf")
    for width, height in grid_pinpoints:
        scale = min(width / original_width, height / original_height)
        downscaled_width, downscaled_height = int(original_width * scale), int(original_height * scale)
        effective = min(downscaled_width * downscaled_height, original_width * original_height)
        wasted = (width * height) - effective
        if effective > max_effective or (effective == max_effective and wasted < min_wasted):
            max_effective, min_wasted, best_fit = effective, wasted, (width, height)
    target_width, target_height = best_fit
    scale_w, scale_h = target_width / original_width, target_height / original_height
    if scale_w < scale_h:
        new_width, new_height = target_width, min(math.ceil(original_height * scale_w), target_height)
    else:
        new_height, new_width = target_height, min(math.ceil(original_width * scale_h), target_width)
    resized = image.resize((new_width, new_height))
    padded = Image.new("RGB", (target_width, target_height), (0, 0, 0))
    padded.paste(resized, ((target_width - new_width) // 2, (target_height - new_height) // 2))
    patches = [padded.crop((j, i, j + crop_size, i + crop_size))
               for i in range(0, target_height, crop_size) for j in range(0, target_width, crop_size)]
    return [image.resize((crop_size, crop_size))] + patches, best_fit
