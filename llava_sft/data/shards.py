"""Streaming reader for the webdataset shards written by `data_prep.make_shards`.

Usage::

    python -m data_prep.make_shards --data llava_v1_5_mix665k.json --image-folder $LLAVA_DATA_ROOT \\
        --out shards/mix665k --samples-per-shard 1000 --workers 16

    ds = ShardDataset("shards/mix665k", tokenizer, get_template("vicuna_v1"), image_processor,
                      tokens_per_image=576, max_length=2048, rank=rank, world_size=world_size, seed=seed)
    loader = DataLoader(ds, batch_size=micro_batch_size, num_workers=4, collate_fn=Collator(pad_id))
    for epoch in ...:
        ds.set_epoch(epoch)          # before iter(loader); not with persistent_workers=True
        for batch in loader: ...

Training from shards: `data.shards: SHARD_DIR` (llava_sft/data/stream.py builds the steps and the resume
position on top of this reader).

On disk (see `data_prep/make_shards.py`): `SHARD_DIR/manifest.json` (shard names and sample
counts, in order) and `SHARD_DIR/shard-NNNNNN.tar`, where each sample is `KEY.json` (the LLaVA
record: id, image path(s), conversations) plus `KEY.0.<ext>`, `KEY.1.<ext>`... (the original image
bytes, one per entry of the record's "image"). The manifest is required: the split below needs
the sample count of every shard.

Samples are exactly those of `LlavaJsonDataset.__getitem__` on the original JSON: the same
`tokenize_conversation`, `fit_length` (over-long policy) and `ImageProcessor` (images decoded from
the stored bytes with PIL), so `Collator` batches them. Bad samples follow `bad_samples`: "error"
raises `BadSampleError` naming the sample; "skip" yields `{"skip": reason, "id": ...}`, which the
Collator removes and reports. One difference: `LlavaJsonDataset` checks every record's structure at
start-up (error listing all, or excluded from the dataset); a stream finds them when it reaches
them (error then, or a yielded skip). Check the JSON with `python -m llava_sft.data.validate`
before converting to catch them up front.

Split rule (exact, no duplicates, no gaps): an epoch orders the shards (the manifest order, or
a permutation seeded by (seed, epoch) when `shuffle_buffer > 0`, the same on every rank and
worker) and numbers the samples g = 0..N-1 in that order (shard by shard, the stored order inside
a shard). Sample g belongs to rank `g % world_size` and, within that rank, to DataLoader worker
`(g // world_size) % num_workers`. Every worker reads the tar headers of every shard but reads
(and decodes) only its own samples' data. Each worker then shuffles its own samples with a buffer
of `shuffle_buffer` samples seeded by (seed, epoch, rank, worker); `shuffle_buffer=0` keeps the
order. The order is therefore a function of (seed, epoch, world_size, num_workers) only.

Uneven counts: rank r gets ceil((N - r) / world_size) samples, so ranks differ by at most one
sample (workers of a rank by at most one too). Nothing is dropped: `len(ds)` is this rank's count,
`ds.rank_counts()` all of them, and an uneven split is logged as a warning at construction. A
DDP trainer must then cope with one rank having one sample (possibly one micro-batch/step) more.
`pad_ranks=True` instead pads as DistributedSampler and `BatchPlan` do: the epoch's sample list
is extended to a multiple of `world_size` with its first samples (g >= N is sample g - N), so
every rank gets the same count and `ds.repeated_per_epoch()` samples (< world_size) are seen twice.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import random
import tarfile
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from llava_sft.data.dataset import SkipReport, control_string_problem, fit_length, image_list
from llava_sft.data.images import ImageProcessor
from llava_sft.data.templates import BadSampleError, ChatTemplate
from llava_sft.data.tokenize import tokenize_conversation

log = logging.getLogger(__name__)

FORMAT = "llava_sft.shards/1"


def load_manifest(shard_dir_or_manifest: str | Path) -> tuple[Path, dict]:
    """-> (shard directory, manifest) for a shard directory or its manifest.json."""
    path = Path(shard_dir_or_manifest)
    manifest_path = path / "manifest.json" if path.is_dir() else path
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path}: no shard manifest (is the conversion with "
                                "data_prep.make_shards complete?)")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{manifest_path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest_path.parent, manifest


class ShardDataset(IterableDataset):
    def __init__(
        self,
        shard_dir_or_manifest: str | Path,
        tokenizer,
        template: ChatTemplate,
        image_processor: ImageProcessor,
        tokens_per_image: int,
        max_length: int,
        overlong: str = "truncate",
        bad_samples: str = "error",
        shuffle_buffer: int = 1000,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        pad_ranks: bool = False,
        verify: bool = True,
        control_strings: str = "refuse",
    ):
        if overlong not in ("truncate", "drop"):
            raise ValueError(f"data.overlong must be 'truncate' or 'drop', got {overlong!r}")
        if bad_samples not in ("error", "skip"):
            raise ValueError(f"data.bad_samples must be 'error' or 'skip', got {bad_samples!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.tokenizer, self.template, self.image_processor = tokenizer, template, image_processor
        self.tokens_per_image, self.max_length = tokens_per_image, max_length
        self.overlong, self.bad_samples = overlong, bad_samples
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.rank, self.world_size, self.pad_ranks = rank, world_size, pad_ranks
        self.epoch, self.skip = 0, 0
        self.verify, self._verified = verify, set()
        self.control_strings = control_strings
        self.report = SkipReport()  # filled by the trainer from the skips its batches report

        self.shard_dir, self.manifest = load_manifest(shard_dir_or_manifest)
        self.shards: list[tuple[Path, int]] = []
        for entry in self.manifest["shards"]:
            path = self.shard_dir / entry["name"]
            if not path.is_file():
                raise FileNotFoundError(f"{path}: shard listed in the manifest is missing")
            if path.stat().st_size != entry["bytes"]:
                raise ValueError(f"{path}: {path.stat().st_size} bytes, the manifest says {entry['bytes']} "
                                 "(incomplete copy or rewritten shard?)")
            self.shards.append((path, int(entry["samples"])))
        self.digests = [entry.get("sha256") for entry in self.manifest["shards"]]
        self.num_samples = sum(n for _, n in self.shards)
        if self.num_samples == 0:
            raise ValueError(f"{self.shard_dir}: the shards hold no sample")
        counts = self.rank_counts()
        log.info("%s: %d samples in %d shards; rank %d/%d gets %d per epoch", self.shard_dir, self.num_samples,
                 len(self.shards), rank, world_size, counts[rank])
        if len(set(counts)) > 1:
            log.warning("%s: %d samples do not split evenly over %d ranks: ranks get %d to %d samples per epoch "
                        "(none dropped; pad_ranks=True repeats %d to even them out)", self.shard_dir,
                        self.num_samples, world_size, min(counts), max(counts), max(counts) * world_size -
                        self.num_samples)
        if pad_ranks and self.repeated_per_epoch():
            log.info("pad_ranks: %d sample(s) repeated per epoch so every rank gets %d", self.repeated_per_epoch(),
                     counts[rank])

    # ------------------------------------------------------------------ split
    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """The epoch to stream; `skip`: how many samples of this rank's epoch a DataLoader over this dataset
        (`batch_size=None`, any number of workers) has already yielded: they are passed over without being
        decoded, so iteration resumes exactly after them (a DataLoader takes its workers' samples in turn)."""
        self.epoch, self.skip = epoch, skip

    def _padded_total(self) -> int:
        if not self.pad_ranks:
            return self.num_samples
        return -(-self.num_samples // self.world_size) * self.world_size

    def repeated_per_epoch(self) -> int:
        return self._padded_total() - self.num_samples

    def rank_counts(self) -> list[int]:
        """Samples per epoch of each rank (over all its DataLoader workers)."""
        return [len(range(r, self._padded_total(), self.world_size)) for r in range(self.world_size)]

    def worker_counts(self, num_workers: int) -> list[int]:
        """Samples per epoch of each DataLoader worker of this rank."""
        m = self.world_size * num_workers
        return [len(range(self.rank + self.world_size * w, self._padded_total(), m)) for w in range(num_workers)]

    def __len__(self) -> int:
        return self.rank_counts()[self.rank]

    def shard_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.shards)))
        if self.shuffle_buffer > 0:
            random.Random(f"shards-{self.seed}-{epoch}").shuffle(order)
        return order

    def _positions(self, epoch: int, worker: int, num_workers: int) -> list[tuple[int, list[int]]]:
        """[(shard index, [positions in the shard])] this worker reads this epoch, in reading order."""
        m, stream_slot = self.world_size * num_workers, self.rank + self.world_size * worker
        order = self.shard_order(epoch)
        plan, offsets, offset = [], [], 0
        for s in order:
            n = self.shards[s][1]
            offsets.append(offset)
            positions = list(range((stream_slot - offset) % m, n, m))
            if positions:
                plan.append((s, positions))
            offset += n
        # pad_ranks: virtual samples g in [N, padded) repeat sample g - N (the first ones of the epoch)
        for g in range(self.num_samples, self._padded_total()):
            if g % m == stream_slot:
                k, h = 0, g - self.num_samples
                while h >= self.shards[order[k]][1]:
                    h -= self.shards[order[k]][1]
                    k += 1
                plan.append((order[k], [h]))
        return plan

    # -------------------------------------------------------------- iteration
    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        # Resuming after `self.skip` samples: a DataLoader takes its workers' samples in turn from worker 0, an
        # uninterrupted epoch's next sample came from worker skip % num_workers, so worker w now streams what
        # worker (w + skip) % num_workers streamed then, past the samples of it already taken.
        worker = (worker + self.skip) % num_workers
        epoch = self.epoch
        raw = self._raw_samples(self._positions(epoch, worker, num_workers),
                                verifier=self.rank + self.world_size * worker, verifiers=self.world_size * num_workers)
        if self.shuffle_buffer > 0:
            raw = _buffer_shuffle(raw, self.shuffle_buffer,
                                  random.Random(f"buffer-{self.seed}-{epoch}-{self.rank}-{worker}"))
        skip = len(range(worker, self.skip, num_workers))  # this worker's samples among those already taken
        for n, (shard, key, fields) in enumerate(raw):
            if n >= skip:
                yield self._sample(shard, key, fields)

    def _raw_samples(self, plan, verifier: int = 0, verifiers: int = 1):
        for s, positions in plan:
            path, n = self.shards[s]
            if self.verify and s % verifiers == verifier and s not in self._verified:
                self._check_digest(s)
            yield from ((path.name, key, fields) for key, fields in read_shard(path, positions, n))

    def _check_digest(self, s: int) -> None:
        """The shard's sha256 against the manifest's: the size check alone let same-size corruption train.
        Each shard is hashed by one process (rank x worker), once per process: a full read of the data per epoch
        spread over all of them, not one per process."""
        path, want = self.shards[s][0], self.digests[s]
        if want is None:
            return
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
        if digest.hexdigest() != want:
            raise ValueError(f"{path}: sha256 {digest.hexdigest()[:16]}... but the manifest says {want[:16]}... "
                             "(a corrupted or rewritten shard): copy it again or rebuild it with data_prep.make_shards; "
                             "data.verify_shards=false skips this check")
        self._verified.add(s)

    def _sample(self, shard: str, key: str, fields: dict[str, bytes]) -> dict:
        sample_id = key
        try:
            try:
                record = json.loads(fields["json"])
            except (KeyError, ValueError) as e:  # a bad sample like any other: the data.bad_samples policy
                raise BadSampleError(key, f"unreadable json member in {shard} ({type(e).__name__}: {e})") from None
            sample_id = record.get("id", key) if isinstance(record, dict) else key
            return self._load(record, sample_id, shard, key, fields)
        except BadSampleError as e:
            if self.bad_samples == "error":
                raise
            return {"skip": e.reason, "id": str(sample_id)}

    def _load(self, record, sample_id, shard: str, key: str, fields: dict[str, bytes]) -> dict:
        if not isinstance(record, dict) or "conversations" not in record:
            raise BadSampleError(sample_id, "not a record with 'conversations'")
        problem = control_string_problem(record["conversations"], self.template, self.tokenizer)
        if problem and self.control_strings == "refuse":
            raise BadSampleError(sample_id, problem)
        names = image_list(record, sample_id)
        stored = {}
        for field, data in fields.items():
            head, _, _ = field.partition(".")
            if head.isdigit():
                stored[int(head)] = (field, data)
        if sorted(stored) != list(range(len(names))):
            raise BadSampleError(sample_id, f"{shard}: {len(names)} image path(s) in the record but image members "
                                 f"{sorted(f for f, _ in stored.values())} under key {key}")
        images, converted = [], 0
        for k, name in enumerate(names):
            field, data = stored[k]
            try:
                with Image.open(io.BytesIO(data)) as image:
                    image.load()
                    pixels, changed = self.image_processor.process(image)
                    images.append(pixels)
                    converted += changed
            except Exception as e:  # PIL raises many kinds for corrupt files
                raise BadSampleError(sample_id, f"corrupt image: {name} ({shard}:{key}.{field}; "
                                     f"{type(e).__name__}: {e})") from None
        ids, labels = tokenize_conversation(
            record["conversations"], self.tokenizer, self.template, num_images=len(images), sample_id=sample_id
        )
        ids, labels, truncated = fit_length(ids, labels, self.max_length, self.tokens_per_image, self.overlong, sample_id)
        size = self.image_processor.size
        pixels = torch.stack(images) if images else torch.zeros(0, 3, size, size)
        return {"id": str(sample_id), "input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
                "images": pixels, "image_sizes": [None] * len(images), "image_tokens": torch.full((len(images),), self.tokens_per_image, dtype=torch.long),
                "truncated": truncated, "converted": converted}


def read_shard(path: Path, positions: list[int], expected: int | None = None):
    """Yield (key, {field: bytes}) for the samples at `positions` (ascending) of a shard.

    Only tar headers are read for the other samples (their data is skipped by seeking).
    `expected`: the manifest's sample count, checked against the shard.
    """
    if positions != sorted(set(positions)):
        raise ValueError("positions must be ascending and distinct")
    wanted = set(positions)
    pos, key, fields = -1, None, None
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            k, _, field = member.name.rpartition("/")[2].partition(".")
            if k != key:
                if fields is not None:
                    yield key, fields
                pos, key = pos + 1, k
                fields = {} if pos in wanted else None
            if fields is not None:
                fields[field] = tar.extractfile(member).read()
        if fields is not None:
            yield key, fields
    if expected is not None and pos + 1 != expected:
        raise ValueError(f"{path}: {pos + 1} samples, the manifest says {expected}")
    if positions and positions[-1] > pos:
        raise ValueError(f"{path}: {pos + 1} samples, no sample at position {positions[-1]}")


def _buffer_shuffle(items, size: int, rng: random.Random):
    """Shuffle a stream with a buffer of `size` items (webdataset-style)."""
    buffer = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer
