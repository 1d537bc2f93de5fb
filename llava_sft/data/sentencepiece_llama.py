"""Llama/Vicuna SentencePiece tokenization exactly as transformers 4.x's slow `LlamaTokenizer` did, read from the
SentencePiece model itself -- for transformers 5.x, where that class is gone.

Why: LLaVA-1.5's reference ids come from the slow tokenizer (`use_fast=False`, legacy). In transformers 5.x
`LlamaTokenizer` is the tokenizers-backed class, whose Metaspace pre-tokenizer adds the "\u2581" prefix only when
the text does not already start with one: " USER" gives ["\u2581USER"] where the slow tokenizer's SentencePiece
dummy prefix gave ["\u2581", "\u2581USER"] (measured on our trained Vicuna-style tokenizer, 4.57.6 vs 5.24.0; the
chunk after an `<image>` and any reply that starts with a space are such texts). So on 5.x, `data/tokenize.py`
encodes SentencePiece Llama tokenizers here; on 4.x the slow tokenizer is used as is, and
tests/test_sentencepiece_llama.py checks on 4.x that this module gives its ids for legacy and non-legacy
tokenizers.

What it reproduces (transformers 4.57 `LlamaTokenizer.tokenize` / `_tokenize` / `get_spm_processor` and
`PreTrainedTokenizer.tokenize`):
  * the text is split at every added token (longest match first, as the tokens trie), honouring an added token's
    lstrip / rstrip; empty pieces are skipped; added tokens map to their own ids;
  * legacy: every other piece is `sp.encode(piece)`, so each piece gets SentencePiece's dummy prefix;
  * non-legacy: "\u2581" in the text becomes " ", one "\u2581" is put in front of the whole text (add_prefix_space),
    the SentencePiece model is loaded without its dummy prefix, a piece starting with "\u2581" or " " is encoded
    behind the unk token, whose pieces are then dropped, and a leading lone "\u2581" before a special token is
    dropped;
  * `<s>` in front when add_bos_token, `</s>` at the end when add_eos_token.
"""
from __future__ import annotations

import re
import weakref
from functools import lru_cache
from pathlib import Path

SPIECE_UNDERLINE = "\u2581"


def is_sentencepiece_llama(tokenizer) -> bool:
    """A Llama-family tokenizer backed by a SentencePiece model file (Vicuna, Llama-1/2, Mistral-style).
    Asked once per encode call on 5.x, so the answer (a file stat) is kept per tokenizer object."""
    try:
        return _IS_SP_LLAMA[tokenizer]
    except (KeyError, TypeError):
        pass
    vocab_file = getattr(tokenizer, "vocab_file", None)
    answer = ("Llama" in type(tokenizer).__name__ and isinstance(vocab_file, str) and vocab_file.endswith(".model")
              and Path(vocab_file).is_file())
    try:
        _IS_SP_LLAMA[tokenizer] = answer
    except TypeError:  # not weak-referenceable: asked again next time
        pass
    return answer


class SlowLlamaEncoder:
    """`encoder(text)` -> the ids of 4.x's slow `LlamaTokenizer(text, add_special_tokens=True)`."""

    def __init__(self, vocab_file: str, legacy: bool, add_prefix_space: bool, added: tuple[tuple[str, int, bool, bool], ...],
                 special: frozenset[str], unk_token: str, bos_id: int | None, eos_id: int | None):
        import sentencepiece as spm

        self.legacy, self.add_prefix_space, self.unk_token = legacy, add_prefix_space, unk_token
        self.bos_id, self.eos_id, self.special = bos_id, eos_id, special
        self.added = {content: (token_id, lstrip, rstrip) for content, token_id, lstrip, rstrip in added}
        by_length = sorted(self.added, key=len, reverse=True)
        self.splitter = re.compile("(" + "|".join(re.escape(t) for t in by_length) + ")") if by_length else None
        if legacy:
            self.sp = spm.SentencePieceProcessor(model_file=vocab_file)
        else:  # get_spm_processor: the model without its dummy prefix
            from sentencepiece import sentencepiece_model_pb2

            model = sentencepiece_model_pb2.ModelProto.FromString(Path(vocab_file).read_bytes())
            model.normalizer_spec.add_dummy_prefix = False
            self.sp = spm.SentencePieceProcessor(model_proto=model.SerializeToString())
        self.unk_length = len(self.sp.encode(str(unk_token), out_type=str))

    @classmethod
    def of(cls, tokenizer) -> "SlowLlamaEncoder":
        """The encoder of an HF Llama tokenizer (cached per tokenizer object)."""
        try:
            return _BY_TOKENIZER[tokenizer]
        except KeyError:
            pass
        unsupported(tokenizer)
        added = tuple(sorted((t.content, i, bool(getattr(t, "lstrip", False)), bool(getattr(t, "rstrip", False)))
                             for i, t in tokenizer.added_tokens_decoder.items()))
        legacy, prefix = getattr(tokenizer, "legacy", None), getattr(tokenizer, "add_prefix_space", None)
        # BOS / EOS from what the tokenizer does, not its flags: a 5.x tokenizer reloaded from its own save reports
        # add_bos_token=False while its post-processor adds <s> (5.24.0)
        with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
        without = tokenizer("a", add_special_tokens=False)["input_ids"]
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        adds_bos = bos is not None and with_special[:1] == [bos] and without[:1] != [bos]
        adds_eos = eos is not None and with_special[-1:] == [eos] and without[-1:] != [eos]
        encoder = _encoder(
            tokenizer.vocab_file, True if legacy is None else bool(legacy),  # 4.x: unset means legacy (with a warning)
            True if prefix is None else bool(prefix), added, frozenset(tokenizer.all_special_tokens),
            str(tokenizer.unk_token), bos if adds_bos else None, eos if adds_eos else None,
        )
        _BY_TOKENIZER[tokenizer] = encoder
        return encoder

    def _split(self, text: str) -> list[str]:
        """PreTrainedTokenizer.tokenize's split at added tokens, with their lstrip / rstrip."""
        if self.splitter is None:
            return [text]
        parts = self.splitter.split(text)  # odd positions are added tokens
        for i in range(1, len(parts), 2):
            _, lstrip, rstrip = self.added[parts[i]]
            if lstrip and i > 0:
                parts[i - 1] = parts[i - 1].rstrip()
            if rstrip and i + 1 < len(parts):
                parts[i + 1] = parts[i + 1].lstrip()
        return parts

    def _pieces(self, text: str) -> list[str]:
        """LlamaTokenizer._tokenize."""
        if self.legacy or not text.startswith((SPIECE_UNDERLINE, " ")):
            return self.sp.encode(text, out_type=str)
        pieces = self.sp.encode(self.unk_token + text, out_type=str)
        return pieces[self.unk_length:] if len(pieces) >= self.unk_length else pieces

    def __call__(self, text: str) -> list[int]:
        tokens: list[str] = []
        if text:
            if not self.legacy:
                text = text.replace(SPIECE_UNDERLINE, " ")
                if self.add_prefix_space:
                    text = SPIECE_UNDERLINE + text
            parts = self._split(text)
            for i, part in enumerate(parts):
                if not part:
                    continue
                tokens.extend([part] if i % 2 else self._pieces(part))
            if not self.legacy and len(tokens) > 1 and tokens[0] == SPIECE_UNDERLINE and tokens[1] in self.special:
                tokens = tokens[1:]
        ids = [self.added[t][0] if t in self.added else self.sp.piece_to_id(t) for t in tokens]
        return ([self.bos_id] if self.bos_id is not None else []) + ids + ([self.eos_id] if self.eos_id is not None
                                                                           else [])


class UnreproducibleTokenizer(ValueError):
    """A setting of a SentencePiece Llama tokenizer that SlowLlamaEncoder does not reproduce."""


def check_reproducible(tokenizer) -> None:
    """On transformers 5.x a SentencePiece Llama tokenizer is encoded by SlowLlamaEncoder, which does not reproduce
    added tokens with `single_word=True` (4.x's trie matches them only as whole words) nor `split_special_tokens=True`
    (special tokens encoded as text): refused, naming them, rather than giving other ids than 4.x. No Vicuna or
    Llama-2 tokenizer sets either. On 4.x (the slow class encodes) nothing is checked."""
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5 or not is_sentencepiece_llama(tokenizer):
        return
    unsupported(tokenizer)


def reproducible(tokenizer) -> bool:
    """Does SlowLlamaEncoder give this tokenizer's ids (no setting `unsupported` names)? Kept per tokenizer object
    and its size (asked once per encode call)."""
    try:
        size, answer = _REPRODUCIBLE[tokenizer]
        if size == len(tokenizer):
            return answer
    except (KeyError, TypeError):
        pass
    try:
        unsupported(tokenizer)
        answer = True
    except UnreproducibleTokenizer:
        answer = False
    try:
        _REPRODUCIBLE[tokenizer] = (len(tokenizer), answer)
    except TypeError:
        pass
    return answer


def unsupported(tokenizer) -> None:
    """Raise UnreproducibleTokenizer naming every setting SlowLlamaEncoder does not reproduce (any stack)."""
    problems = []
    single = sorted(t.content for t in tokenizer.added_tokens_decoder.values() if getattr(t, "single_word", False))
    if single:
        problems.append(f"added tokens with single_word=True ({', '.join(single[:5])})")
    if getattr(tokenizer, "split_special_tokens", False):
        problems.append("split_special_tokens=True")
    if problems:
        raise UnreproducibleTokenizer(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')}: {' and '.join(problems)}: transformers 5.x has no "
            f"slow Llama tokenizer and our exact re-implementation of its ids (data/sentencepiece_llama.py) does not "
            f"reproduce this setting. Train on the reproduction stack (constraints/repro.txt, transformers 4.x), or "
            f"remove the setting from tokenizer_config.json / tokenizer.json")


@lru_cache(maxsize=8)
def _encoder(*key) -> SlowLlamaEncoder:
    return SlowLlamaEncoder(*key)


# A tokenizer's added tokens can change after its encoder is made (the export adds <image> to a tokenizer it has
# used already): the key below holds them, so such a tokenizer gets a new encoder.
class _EncoderCache:
    def __init__(self):
        self._items: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __getitem__(self, tokenizer) -> SlowLlamaEncoder:
        size, encoder = self._items[tokenizer]
        if size != len(tokenizer):
            raise KeyError(tokenizer)
        return encoder

    def __setitem__(self, tokenizer, encoder: SlowLlamaEncoder) -> None:
        self._items[tokenizer] = (len(tokenizer), encoder)


_BY_TOKENIZER = _EncoderCache()


def save_tokenizer(tokenizer, out_dir) -> None:
    """`tokenizer.save_pretrained(out_dir)`, keeping what the slow tokenization needs: transformers 5.x writes
    no tokenizer.model and drops `legacy` / `add_bos_token` / `add_eos_token` from tokenizer_config.json (a 5.x
    save reloaded as legacy=False without BOS, measured on 5.24.0), so both are put back for SentencePiece Llama
    tokenizers, and the directory tokenizes the same after a reload, on either stack."""
    import json
    import shutil

    out = Path(out_dir)
    tokenizer.save_pretrained(out)
    if not is_sentencepiece_llama(tokenizer):
        return
    model_file = out / "tokenizer.model"
    if not model_file.exists():
        shutil.copyfile(tokenizer.vocab_file, model_file)
    config_file = out / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    encoder = SlowLlamaEncoder.of(tokenizer)
    wanted = {"legacy": encoder.legacy, "add_bos_token": encoder.bos_id is not None,
              "add_eos_token": encoder.eos_id is not None}
    if not encoder.add_prefix_space:  # the default (True) stays unwritten: 4.x's fast class would convert from slow
        wanted["add_prefix_space"] = False
    changed = any(config.get(k) != v for k, v in wanted.items())
    config.update(wanted)
    # 5.x lists the named special tokens again under extra_special_tokens, a list that 4.x cannot read (it wants a
    # dict): repeats of named tokens are dropped, so the directory loads on the reproduction stack too
    named = {config.get(k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    extra = config.get("extra_special_tokens")
    if isinstance(extra, list) and all(isinstance(t, str) and t in named for t in extra):
        del config["extra_special_tokens"]
        changed = True
    if changed:
        config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
_IS_SP_LLAMA: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_REPRODUCIBLE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
