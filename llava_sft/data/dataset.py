"""LLaVA-format JSON + image folder -> tokenized samples and padded batches.

Reads `[{"id", "image"?: str | [str], "conversations": [{"from": "human"|"gpt", "value"}]}]`
(LLaVA-Pretrain 558K, CC3M-595K chat.json, llava_instruct_150k, llava_v1_5_mix665k).

Bad input never disappears silently. At start-up (data/catalog.py: once per node, cached) every record's structure,
text, length under the over-long policy and images (data.check_images_at_start) are checked; problems either stop
the run with a list naming the samples (`bad_samples: error`, the default) or are skipped and listed in the run
report (`bad_samples: skip`). A problem only visible when a sample is loaded (an image that broke after the check,
a template not fitting the tokenizer) follows the same policy at run time. Over-long samples (counted after image
expansion) follow `overlong`:
  truncate - cut text after the last image so the sample fits (never through an image's tokens);
             if the images themselves do not fit, or no supervised token is left, drop it (counted)
  drop     - drop it (counted)
"""
from __future__ import annotations

import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from llava_sft.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava_sft.data.anyres import image_token_counts
from llava_sft.data.catalog import OK, Catalog, StartupSettings, prepare
from llava_sft.data.images import ImageProcessor
from llava_sft.data.templates import BadSampleError, ChatTemplate
from llava_sft.data.tokenize import tokenize_conversation

log = logging.getLogger(__name__)


@dataclass
class SkipReport:
    """Counts and ids of samples not trained on (or changed), written to the run directory."""

    skipped: list[tuple[str, str]] = field(default_factory=list)  # (sample id, reason)
    truncated: int = 0
    converted_images: int = 0  # 16-bit / float / alpha images converted faithfully (data/images.py: to_rgb)

    def add(self, sample_id, reason: str) -> None:
        self.skipped.append((str(sample_id), reason))

    def distinct(self) -> list[tuple[str, str]]:
        """Each skipped sample once (a sample repeated to fill a last batch, or met in every epoch, was skipped
        each time it came up), in the order first met."""
        return list(dict.fromkeys(self.skipped))

    def counts(self) -> dict[str, int]:
        """Skipped samples per kind of problem (the reason without its sample-specific details), each sample once."""
        return dict(Counter(_kind(reason) for _, reason in self.distinct()))


def _kind(reason: str) -> str:
    kind = reason.split(":")[0]
    kind = re.sub(r"\s*\([^)]*\)", "", kind)
    return re.sub(r"\d+", "N", kind).strip()


def control_string_problem(conversations: list, template: ChatTemplate, tokenizer) -> str | None:
    """A turn whose text contains the template's markers or the tokenizer's special tokens: a literal '</s>' in a
    reply becomes a real end-of-turn token inside the supervised span, a 'USER:' teaches the model to speak for the
    user. -> the reason (for data.control_strings=refuse), or None."""
    strings = set(template.control_strings()) | {t for t in getattr(tokenizer, "all_special_tokens", []) if t.strip()}
    for k, turn in enumerate(conversations):
        text = turn.get("value", "") if isinstance(turn, dict) else ""
        hits = sorted(s for s in strings if isinstance(text, str) and s in text)
        if hits:
            return (f"control string {hits[0]!r} in turn {k} ({turn.get('from')}): it would be read as a real chat "
                    f"marker; clean the text, or data.control_strings=keep to train it as it is")
    return None


def image_list(record: dict, sample_id="?") -> list[str]:
    """The sample's image paths ("image" may be one path or a list of paths)."""
    image = record.get("image")
    if image is None:
        return []
    if isinstance(image, str):
        return [image]
    if isinstance(image, list) and all(isinstance(x, str) for x in image):
        return list(image)
    raise BadSampleError(sample_id, f"bad 'image' field: expected a path or a list of paths, got {image!r}")


def read_records(path: str | Path) -> list[dict]:
    """The samples of a LLaVA JSON file (a list of records) or of a JSONL file (one record per line, as instruction
    data often comes, whatever the file is called): the first non-blank character decides ('{' = JSONL). A bad
    line is an error naming it."""
    text = Path(path).read_text()
    if text.lstrip()[:1] != "{":  # a JSON list (anything else that is not JSONL fails here, with the reason)
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e}); a file with one record per line must be JSONL (a "
                             f"JSON object per line, no enclosing list)") from e
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON list of samples (or JSONL: one JSON object per line)")
        return records
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {number}: not a JSON object ({e.msg})") from e
        if not isinstance(record, dict):
            raise ValueError(f"{path}, line {number}: expected a JSON object (a sample), got {type(record).__name__}")
        records.append(record)
    return records


class Records:
    """The kept samples as a read-only sequence of dicts, decoded on access from the catalog's shared buffer."""

    def __init__(self, catalog: Catalog, keep: np.ndarray):
        self.catalog, self.keep = catalog, keep

    def __len__(self) -> int:
        return len(self.keep)

    def __getitem__(self, index: int) -> dict:
        return self.catalog.record(int(self.keep[index]))


class LlavaJsonDataset(Dataset):
    pairs = False  # data/preference.py's PreferenceDataset: records are preference pairs

    def __init__(
        self,
        json_path: str | Path,
        image_folder: str | Path,
        tokenizer,
        template: ChatTemplate,
        image_processor: ImageProcessor,
        tokens_per_image: int,
        max_length: int,
        overlong: str = "truncate",
        bad_samples: str = "error",
        check_images: str | bool = "header",
        control_strings: str = "refuse",
        cache_dir: str | None = None,
        startup_cache: bool = True,
        cache_samples: bool = False,
    ):
        if overlong not in ("truncate", "drop"):
            raise ValueError(f"data.overlong must be 'truncate' or 'drop', got {overlong!r}")
        if bad_samples not in ("error", "skip"):
            raise ValueError(f"data.bad_samples must be 'error' or 'skip', got {bad_samples!r}")
        check_images = {True: "header", False: "off"}.get(check_images, check_images)
        self.image_folder = Path(image_folder)
        self.tokenizer, self.template, self.image_processor = tokenizer, template, image_processor
        self.tokens_per_image, self.max_length = tokens_per_image, max_length
        self.overlong, self.bad_samples, self.control_strings = overlong, bad_samples, control_strings
        self.report = SkipReport()
        # data.cache_samples: index -> the sample as first loaded (the collators copy out of it, never into it)
        self._cache: dict[int, dict] | None = {} if cache_samples else None
        settings = StartupSettings(template, tokenizer, tokens_per_image, max_length, overlong, control_strings,
                                   check_images, image_processor.anyres, self.pairs)
        catalog = prepare(json_path, self.image_folder, settings, cache_dir, startup_cache, read=self.read)
        problems = catalog.problems()
        if problems and self.bad_samples == "error":
            listing = "\n".join(f"  - {e}" for e in problems[:20])
            more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
            raise BadSampleError(problems[0].sample_id, f"{len(problems)} bad sample(s) found at start-up "
                                 f"(set data.bad_samples=skip to skip and report them):\n{listing}{more}")
        for e in problems:
            self.report.add(e.sample_id, e.reason)
        keep = np.flatnonzero(catalog.state == OK)
        self.records, self._approx, self._has_image = Records(catalog, keep), catalog.approx[keep], catalog.n_images[keep] > 0
        self.kept_with_control_strings = catalog.meta["kept_with_control_strings"]
        log.info("%s: %d samples (%d with images), %d rejected at start-up; %d longer than max_length %d will be "
                 "truncated (data.overlong=%s)", json_path, len(keep), int(self._has_image.sum()), len(problems),
                 catalog.meta["will_truncate"], max_length, overlong)
        if self.kept_with_control_strings:
            log.warning("%s: %d samples contain the template's markers or special tokens in their text, trained as "
                        "they are (data.control_strings=keep)", json_path, self.kept_with_control_strings)

    @staticmethod
    def read(path) -> list[dict]:
        return read_records(path)

    # ------------------------------------------------------------------ samples
    @property
    def num_samples(self) -> int:  # as ShardDataset.num_samples: the samples of all ranks
        return len(self)

    def __len__(self) -> int:
        return len(self.records)

    def has_image(self, index: int) -> bool:
        return bool(self._has_image[index])

    def approx_length(self, index: int) -> int:
        """Cheap length estimate for batching by length (words + image tokens), as LLaVA does."""
        return int(self._approx[index])

    def __getitem__(self, index: int) -> dict:
        if self._cache is not None and index in self._cache:
            return dict(self._cache[index])
        record = self.records[index]
        sample_id = record.get("id", f"#{index}")
        try:
            sample = self._load(record, sample_id)
        except BadSampleError as e:
            if self.bad_samples == "error":
                raise
            sample = {"skip": e.reason, "id": str(sample_id)}
        if self._cache is not None:
            self._cache[index] = sample
            if len(self._cache) == len(self):
                size = sum(v.numel() * v.element_size() for item in self._cache.values() for v in item.values()
                           if isinstance(v, torch.Tensor))
                log.info("data.cache_samples: all %d samples held in memory (%.0f MB); later epochs read nothing "
                         "from disk", len(self), size / 2**20)
        return dict(sample)

    def _load(self, record: dict, sample_id) -> dict:
        names = image_list(record)
        loaded = [self._load_image(name, sample_id, alone=len(names) == 1) for name in names]
        ids, labels = tokenize_conversation(
            record["conversations"], self.tokenizer, self.template, num_images=len(names), sample_id=sample_id
        )
        sizes = [size for _, size, _ in loaded]
        counts = image_token_counts(sizes, self.tokens_per_image, self.image_processor.anyres)
        ids, labels, truncated = fit_length(ids, labels, self.max_length, counts, self.overlong, sample_id)
        size = self.image_processor.size
        pixels = torch.cat([p for p, _, _ in loaded]) if loaded else torch.zeros(0, 3, size, size)
        return {"id": str(sample_id), "input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
                "images": pixels, "image_sizes": sizes, "image_tokens": torch.tensor(counts, dtype=torch.long),
                "truncated": truncated, "converted": sum(c for _, _, c in loaded)}

    def _load_image(self, name: str, sample_id, alone: bool = True):
        """(pixels [k, 3, S, S], size for AnyRes tiles or None, converted): ImageProcessor.tiles."""
        path = self.image_folder / name
        try:
            with Image.open(path) as image:
                image.load()
                return self.image_processor.tiles(image, alone)
        except FileNotFoundError:
            raise BadSampleError(sample_id, f"missing image file: {path}") from None
        except Exception as e:  # PIL raises many kinds for corrupt files
            raise BadSampleError(sample_id, f"corrupt image: {path} ({type(e).__name__}: {e})") from None


def fit_length(ids: list[int], labels: list[int], max_length: int, image_tokens: int | list[int], overlong: str,
               sample_id="?"):
    """Apply the over-long policy (see module docstring) -> (ids, labels, truncated?) or BadSampleError.
    `image_tokens`: the feature tokens of every image, or of each (AnyRes: they differ)."""
    n_images = ids.count(IMAGE_TOKEN_INDEX)
    counts = [image_tokens] * n_images if isinstance(image_tokens, int) else list(image_tokens)
    if len(counts) != n_images:
        raise BadSampleError(sample_id, f"{n_images} image placeholder(s) in the tokens but {len(counts)} image(s)")
    extra = sum(t - 1 for t in counts)
    expanded = len(ids) + extra
    if expanded <= max_length:
        return ids, labels, False
    if overlong == "drop":
        raise BadSampleError(sample_id, f"overlong: {expanded} tokens after image expansion > max_length {max_length}")
    keep = max_length - extra  # number of ids to keep so that the expanded length fits
    last_image = max((i for i, t in enumerate(ids) if t == IMAGE_TOKEN_INDEX), default=-1)
    if keep <= last_image + 1:
        raise BadSampleError(sample_id, f"overlong: image tokens end beyond max_length {max_length} ({expanded} tokens)")
    ids, labels = ids[:keep], labels[:keep]
    if all(label == IGNORE_INDEX for label in labels[1:]):
        raise BadSampleError(sample_id, f"overlong: no supervised token left within max_length {max_length}")
    return ids, labels, True


class Collator:
    """Right-pads a list of samples into a batch; skipped samples are removed and reported. With `split` (a
    sample -> its rows: data/preference.py's pair_sides) each sample is a unit of several rows, in order, and the
    batch counts units (`ids`, `pairs`)."""

    def __init__(self, pad_token_id: int, split=None):
        self.pad_token_id, self.split = pad_token_id, split

    def __call__(self, samples: list[dict]) -> dict:
        kept = [s for s in samples if "skip" not in s]
        batch = {"skipped": [(s["id"], s["skip"]) for s in samples if "skip" in s],
                 "truncated": sum(s["truncated"] for s in kept), "ids": [s["id"] for s in kept],
                 "converted": sum(s.get("converted", 0) for s in kept)}
        if not kept:
            return batch
        rows = [part for s in kept for part in self.split(s)] if self.split else kept
        length = max(len(s["input_ids"]) for s in rows)
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for row, s in enumerate(rows):
            n = len(s["input_ids"])
            input_ids[row, :n], labels[row, :n], attention_mask[row, :n] = s["input_ids"], s["labels"], 1
        batch.update(input_ids=input_ids, labels=labels, attention_mask=attention_mask, **image_fields(rows),
                     **unit_fields(rows, len(kept) if self.split else None))
        return batch


def unit_fields(rows: list[dict], units: int | None) -> dict:
    """Preference batches: the number of pairs and, where the rows carry them, the reference log-probs of each row
    (in row order: chosen, rejected, chosen, ...)."""
    if units is None:
        return {}
    fields = {"pairs": units}
    if rows and all("reference" in s for s in rows):
        fields["reference_logps"] = torch.tensor([s["reference"] for s in rows], dtype=torch.float64)
    return fields


def image_fields(samples: list[dict]) -> dict:
    """The batch's images, in order of appearance: all tiles, each image's size (AnyRes; None: one view) and each
    image's feature-token count. Samples that share their image tensor (the two sides of a preference pair,
    data/preference.py) share its images: those are in the batch once, and `image_index` says, for each image
    placeholder in order of appearance, which of the batch's images it shows (absent when every image is its own)."""
    unique, sizes, index, first = [], [], [], {}
    for s in samples:
        n = len(s["image_sizes"]) if "image_sizes" in s else s["images"].shape[0]
        key = id(s["images"])
        if key not in first:
            first[key] = len(sizes)
            unique.append(s["images"])
            sizes += s.get("image_sizes", [None] * n)
        index += range(first[key], first[key] + n)
    fields = {"images": torch.cat(unique), "image_sizes": sizes,
              # None: samples built without counts (tests, tools): every image counts the model's tokens_per_image
              "image_tokens": torch.cat([s["image_tokens"] for s in samples])
              if all("image_tokens" in s for s in samples) else None}
    if len(index) != len(sizes):
        fields["image_index"] = torch.tensor(index, dtype=torch.long)
    return fields
