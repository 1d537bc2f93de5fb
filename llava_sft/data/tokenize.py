"""Conversation -> (input_ids, labels). The one place where loss masking is decided.

How it works, and why it matches the reference LLaVA-1.5 implementation token for token:

1. The template renders the conversation into text segments, each supervised or not
   (`ChatTemplate.render`).
2. The whole text is tokenized the way LLaVA's `tokenizer_image_token` does: split on `<image>`,
   tokenize every chunk with the tokenizer's own special tokens, keep the first chunk's BOS, drop
   it from later chunks, and put one `IMAGE_TOKEN_INDEX` (-200) per image between the chunks.
3. Labels come from the same full tokenization: for every boundary between a supervised and an
   unsupervised segment, the text before it is tokenized the same way and must be an exact prefix
   of the full token list. The tokens between two boundaries inherit their segment's flag.

No per-template offsets are computed by hand (the reference's `instruction_len - 2`), so a
template that does not fit a tokenizer (a token straddling a turn boundary) is detected and
reported as a `BadSampleError` naming the sample, never silently turned into an all -100 sample.
"""
from __future__ import annotations

from importlib.metadata import version

from llava_sft.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX
from llava_sft.data.sentencepiece_llama import SlowLlamaEncoder, is_sentencepiece_llama, reproducible
from llava_sft.data.templates import BadSampleError, ChatTemplate, Segment

_SLOW_LLAMA_GONE = int(version("transformers").split(".")[0]) >= 5


def tokenize_with_images(text: str, tokenizer) -> list[int]:
    """Tokenize `text`, turning each `<image>` into one IMAGE_TOKEN_INDEX (as LLaVA's tokenizer_image_token).

    Each text chunk is encoded alone; a BOS the tokenizer added to a chunk after an image is dropped. LLaVA drops the
    first token of every later chunk whenever the first chunk starts with BOS, which is right for Llama (it adds BOS
    to each) and wrong for a tokenizer that does not add BOS but whose BOS is a template token: SmolLM2's BOS is
    `<|im_start|>`, and that rule dropped the "\n" after every image (found by the HF export check on the real
    model). So: dropped only where the chunk's ids start with BOS and its text does not.
    """
    pieces = text.split(IMAGE_PLACEHOLDER)
    bos, bos_text = tokenizer.bos_token_id, getattr(tokenizer, "bos_token", None)
    ids = []
    for i, piece in enumerate(pieces):
        chunk = _encode(tokenizer, piece)
        if i > 0:
            ids.append(IMAGE_TOKEN_INDEX)
            if bos is not None and chunk[:1] == [bos] and not (bos_text and piece.startswith(bos_text)):
                chunk = chunk[1:]
        ids.extend(chunk)
    return ids


def _encode(tokenizer, text: str) -> list[int]:
    # SentencePiece Llama tokenizers go through data/sentencepiece_llama.py: on transformers 5.x because the slow
    # class is gone (that module says why), on 4.x for the slow class because it is the same ids 3.4x faster
    # (0.46 against 1.56 ms per demo Stage-2 conversation, tokenizer calls dominate the loader's time; the ids are
    # checked against the slow class in tests/test_sentencepiece_llama.py). A fast 4.x tokenizer is used as is.
    # On 4.x a setting the encoder does not reproduce (single_word added tokens, split_special_tokens) leaves the
    # slow class to encode, as it always did; on 5.x there is no slow class and the encoder refuses it by name.
    if is_sentencepiece_llama(tokenizer) and (_SLOW_LLAMA_GONE or (not getattr(tokenizer, "is_fast", False)
                                                                   and reproducible(tokenizer))):
        return SlowLlamaEncoder.of(tokenizer)(text)
    return tokenizer(text, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]


def tokenize_segments(segments: list[Segment], tokenizer, sample_id="?") -> tuple[list[int], list[int]]:
    """Token ids and labels for rendered segments (labels = ids where supervised, else IGNORE_INDEX)."""
    full_text = "".join(s.text for s in segments)
    ids = tokenize_with_images(full_text, tokenizer)
    labels = [IGNORE_INDEX] * len(ids)
    start_tok, prefix = 0, ""
    for i, seg in enumerate(segments):
        prefix += seg.text
        last = i == len(segments) - 1
        if not last and segments[i + 1].supervised == seg.supervised:
            continue  # not a boundary
        end_tok = len(ids) if last else _prefix_length(prefix, ids, tokenizer, sample_id)
        if seg.supervised:  # an image is never a label (data.loss_on=all supervises segments that hold one)
            labels[start_tok:end_tok] = [IGNORE_INDEX if t == IMAGE_TOKEN_INDEX else t for t in ids[start_tok:end_tok]]
        start_tok = end_tok
    if all(label == IGNORE_INDEX for label in labels):
        raise BadSampleError(sample_id, "no supervised token (nothing to learn from this sample)")
    return ids, labels


def _prefix_length(prefix: str, full_ids: list[int], tokenizer, sample_id) -> int:
    prefix_ids = tokenize_with_images(prefix, tokenizer)
    if full_ids[: len(prefix_ids)] != prefix_ids:
        raise BadSampleError(
            sample_id,
            f"template does not fit the tokenizer: a token straddles the turn boundary after {prefix[-40:]!r} "
            "(tokenizing the text up to that boundary does not give a prefix of the full token sequence)",
        )
    return len(prefix_ids)


def tokenize_conversation(
    conversations: list[dict],
    tokenizer,
    template: ChatTemplate,
    has_image: bool | None = None,
    num_images: int | None = None,
    sample_id="?",
) -> tuple[list[int], list[int]]:
    """Tokens and labels of one LLaVA conversation; images appear as one IMAGE_TOKEN_INDEX each.

    Pass `num_images` (the number of images attached to the sample); `has_image` is accepted as a
    shorthand for samples with one image (True) or none (False).
    """
    if num_images is None:
        num_images = int(bool(has_image))
    segments = template.render(conversations, num_images=num_images, sample_id=sample_id)
    return tokenize_segments(segments, tokenizer, sample_id=sample_id)


def tokenize_prompt(prompt: str, tokenizer) -> list[int]:
    """Tokens of an inference prompt (rendered by `ChatTemplate.generation_prompt`)."""
    return tokenize_with_images(prompt, tokenizer)
