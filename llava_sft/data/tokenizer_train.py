"""Build small but *real* tokenizers offline, at run time.

Tests and the CPU demo must not download anything from a model hub, yet the
tokenization/masking code has to be exercised against the same tokenizer
machinery the real checkpoints use.  This module trains tiny tokenizers that
follow the recipes of the real ones:

* :func:`train_llama_tokenizer` -- a SentencePiece BPE model with the
  Llama-1/2 (and therefore Vicuna) settings, wrapped in the slow Hugging Face
  ``LlamaTokenizer`` (``legacy=True``), with ``pad_token = unk_token`` as
  LLaVA sets it for Vicuna.
* :func:`train_bytelevel_tokenizer` -- a byte-level BPE (Hugging Face
  ``tokenizers``) wrapped in ``PreTrainedTokenizerFast``, with the helpers
  :func:`make_llama3_style_tokenizer` (BOS prepended by a post-processor,
  ``<|eot_id|>`` as EOS) and :func:`make_chatml_style_tokenizer` (no BOS,
  ``<|im_end|>`` as EOS, like Qwen2).

Every function writes a directory that ``transformers.AutoTokenizer
.from_pretrained(out_dir)`` loads offline, and returns that directory.
:func:`demo_corpus` supplies a deterministic little caption/question corpus.
"""

from __future__ import annotations

import io
import random
from importlib.metadata import version
from pathlib import Path
from typing import Iterable

from llava_sft.data.sentencepiece_llama import save_tokenizer

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

# Lines always added to the SentencePiece corpus so that the chat scaffolding
# ("USER:", "ASSISTANT:", punctuation) is covered by proper pieces.
_SCAFFOLD_LINES = [VICUNA_SYSTEM, "USER: ASSISTANT:", "USER: Hello! ASSISTANT: Hi, how can I help?"] * 8

# Pre-tokenization regex of Llama-3 (Qwen2 uses the same one with single digits).
_LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _training_lines(texts: Iterable[str]) -> list[str]:
    """Split texts into non-empty lines (SentencePiece trains on lines, as Llama's
    vocabulary has no newline piece, so "\\n" is handled by byte fallback)."""
    lines = [line for text in texts for line in str(text).split("\n") if line.strip()]
    return lines + list(_SCAFFOLD_LINES)


def minimum_llama_vocab_size(lines: list[str]) -> int:
    """The smallest `vocab_size` SentencePiece accepts for these training lines: 3 special pieces (unk, bos,
    eos) + 256 byte-fallback pieces + every distinct character (character_coverage=1.0 keeps them all; a space is
    the piece "\u2581", which the dummy prefix always adds). Checked against SentencePiece's own
    "Vocabulary size is smaller than required_chars" refusal in tests/test_tokenizer_train.py."""
    return 3 + 256 + len(set("".join(lines).replace(" ", "\u2581")) | {"\u2581"})


def train_llama_tokenizer(texts: Iterable[str], out_dir, vocab_size: int = 1000) -> Path:
    """Train a Llama-1/2 style SentencePiece BPE tokenizer and save it for HF.

    Ids: ``<unk>`` = 0, ``<s>`` = 1 (BOS), ``</s>`` = 2 (EOS), no pad piece;
    byte fallback gives the 256 ``<0xNN>`` pieces (so "\\n" becomes ``<0x0A>``).
    ``vocab_size`` is a soft limit (``hard_vocab_limit=False``) so that a small
    corpus still trains; below ``minimum_llama_vocab_size`` it is a ValueError saying that minimum.  Writes ``out_dir/tokenizer.model`` plus the files of
    ``LlamaTokenizer.save_pretrained`` and returns ``out_dir``.
    """
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    lines = _training_lines(texts)
    minimum = minimum_llama_vocab_size(lines)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size {vocab_size} is below this corpus's minimum of {minimum} (3 special + 256 "
                         f"byte pieces + {minimum - 259} distinct characters): use a vocab_size of at least {minimum}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=1.0,
        byte_fallback=True,
        add_dummy_prefix=True,
        split_digits=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        unk_surface=" \u2047 ",
        num_threads=1,  # deterministic
        minloglevel=2,
    )
    model_file = out_dir / "tokenizer.model"
    model_file.write_bytes(model.getvalue())

    settings = dict(legacy=True, add_bos_token=True, add_eos_token=False, clean_up_tokenization_spaces=False)
    if int(version("transformers").split(".")[0]) >= 5:  # no slow class: the tokenizers-backed one reads the file
        tokenizer = LlamaTokenizer.from_pretrained(out_dir, **settings)
    else:
        tokenizer = LlamaTokenizer(vocab_file=str(model_file), **settings)
    tokenizer.pad_token = tokenizer.unk_token  # what LLaVA does for Vicuna (v1)
    save_tokenizer(tokenizer, out_dir)
    return out_dir


def train_bytelevel_tokenizer(
    texts: Iterable[str],
    out_dir,
    vocab_size: int = 1000,
    *,
    special_tokens: list[str],
    bos_token: str | None,
    eos_token: str,
    pad_token: str | None = None,
) -> Path:
    """Train a byte-level BPE tokenizer and save it as ``PreTrainedTokenizerFast``.

    ``special_tokens`` get the first ids (in the given order) and are never
    split; ``bos_token``/``eos_token``/``pad_token`` must be among them.  When
    ``bos_token`` is given, a post-processor prepends it to every encoded
    sequence (as Llama-3 does); otherwise nothing is added (as Qwen2).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    for tok in (bos_token, eos_token, pad_token):
        if tok is not None and tok not in special_tokens:
            raise ValueError(f"{tok!r} must be listed in special_tokens")
    minimum = len(special_tokens) + 256  # the byte alphabet is always kept; the trainer would silently exceed
    if vocab_size < minimum:
        raise ValueError(f"vocab_size {vocab_size} is below the minimum of {minimum} ({len(special_tokens)} special "
                         f"tokens + 256 byte pieces): use a vocab_size of at least {minimum}")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts) + list(_SCAFFOLD_LINES), trainer=trainer)
    if bos_token is not None:
        bos = (bos_token, tokenizer.token_to_id(bos_token))
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A", pair=f"{bos_token} $A {bos_token} $B:1", special_tokens=[bos]
        )
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)

    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos_token,
        eos_token=eos_token,
        pad_token=pad_token,
        clean_up_tokenization_spaces=False,
    )
    hf_tokenizer.save_pretrained(out_dir)
    return out_dir


def make_llama3_style_tokenizer(texts: Iterable[str], out_dir, vocab_size: int = 1000, pad_token: str | None = None) -> Path:
    """Llama-3 style: BOS ``<|begin_of_text|>`` prepended, EOS ``<|eot_id|>``, no pad by default."""
    return train_bytelevel_tokenizer(
        texts,
        out_dir,
        vocab_size,
        special_tokens=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token=pad_token,
    )


def make_chatml_style_tokenizer(
    texts: Iterable[str], out_dir, vocab_size: int = 1000, pad_token: str | None = "<|endoftext|>"
) -> Path:
    """ChatML / Qwen2 style: no BOS, EOS ``<|im_end|>``, pad ``<|endoftext|>``."""
    return train_bytelevel_tokenizer(
        texts,
        out_dir,
        vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token=pad_token,
    )


def demo_corpus(n_lines: int = 400, seed: int = 0) -> list[str]:
    """A deterministic corpus of captions, questions and answers (for training the
    tokenizers above in tests and the CPU demo); includes digits, punctuation,
    and a little non-ASCII text."""
    rng = random.Random(seed)
    things = ["cat", "dog", "red car", "bicycle", "tree", "bird", "man", "woman", "child", "boat",
              "table", "cup of coffee", "pizza", "train", "horse", "building", "street sign", "laptop"]
    places = ["on a table", "in the park", "near the river", "on the street", "in a kitchen",
              "under a tree", "at the beach", "in a field", "next to a window", "in the city"]
    adjectives = ["small", "large", "bright", "old", "white", "black", "colorful", "wooden", "happy"]
    questions = ["What is in the image?", "Describe the image in detail.", "What color is the {t}?",
                 "How many {t}s are there?", "Where is the {t}?", "Is there a {t} in the picture?",
                 "What is the {t} doing?", "Why is the {t} {p}?"]
    extras = ["The café is open, and the crème brûlée costs 5.50 €.", "中文 文字 和 图像。",
              "Answer: yes; no! (maybe) - 42% of 1,000 items.", "Line one.\nLine two: 3 + 4 = 7."]
    lines = list(extras)
    while len(lines) < n_lines:
        t, p, a = rng.choice(things), rng.choice(places), rng.choice(adjectives)
        n = rng.randint(0, 12)
        kind = rng.randrange(3)
        if kind == 0:
            lines.append(f"A {a} {t} {p}.")
        elif kind == 1:
            lines.append(rng.choice(questions).format(t=t, p=p))
        else:
            lines.append(f"There are {n} {t}s {p}, and the {t} looks {a}.")
    return lines
