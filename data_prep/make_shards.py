"""LLaVA-format JSON + image folder -> webdataset tar shards (parallel, resumable, deterministic).

Usage::

    python -m data_prep.make_shards --data LLaVA-Pretrain/blip_laion_cc_sbu_558k.json \\
        --image-folder LLaVA-Pretrain/images --out shards/pretrain558k \\
        [--samples-per-shard 1000] [--max-shard-bytes 1000000000] [--workers 4] [--seed 0] \\
        [--no-shuffle] [--skip-bad] [--verify-images]

    # read them for training: llava_sft.data.shards.ShardDataset("shards/pretrain558k", ...)

On-disk layout of SHARD_DIR::

    shard-000000.tar          webdataset shard (uncompressed tar, webdataset naming convention)
    shard-000000.tar.done     resume marker: {"fingerprint", "samples", "bytes", "sha256", ...}
    ...
    manifest.json             what the reader uses (see below)

Inside a shard, per sample (members of one sample are consecutive, sorted by field name)::

    000001234.0.png           image bytes, copied unchanged (no re-encoding); the extension is the
    000001234.1.jpg           image file's own (lower-cased); index = position in the record's "image"
    000001234.json            the record: {"id", "image"?: str | [str], "conversations": [...], ...}

The key (`000001234`) is the record's index in the input JSON, zero-padded to 9 digits: unique
and free of dots/slashes whatever the sample ids are; the original id and image paths stay in
the `json` member (a record without "id" gets "#<index>", as `LlavaJsonDataset` names it).
Text-only samples have only the `json` member.

`manifest.json`::

    {"format": "llava_sft.shards/1",
     "source": {"data": "<file name>", "data_sha256": ..., "records": N},
     "options": {"samples_per_shard", "max_shard_bytes", "shuffle", "seed", "skip_bad"},
     "totals": {"shards", "samples", "with_image", "text_only", "images", "bytes",
                "bad_samples", "missing_images"},
     "shards": [{"name", "samples", "with_image", "text_only", "images", "bytes", "sha256"}, ...],
     "bad_samples": [{"index", "id", "reason"}, ...]}

How it works:

* Check: every record is checked (a dict with "conversations", a valid "image" field) and every
  image file is stat-ed (and, with --verify-images, opened and verified by PIL). Bad samples
  (missing/unreadable image, bad record) stop the conversion with an error listing their ids,
  before anything is written; with --skip-bad they are left out and listed in the manifest
  ("bad_samples", "totals.missing_images"). Never a silent drop. Structure against a chat template
  is not checked here (the converter is template-agnostic): run `python -m llava_sft.data.validate`
  on the JSON first, or let the reader's `bad_samples` policy handle it.
* Plan: the kept records are permuted with `random.Random(seed)` (unless --no-shuffle; LLaVA
  mixtures are ordered by source, and a streaming reader only shuffles within a buffer) and cut
  into consecutive shards of at most --samples-per-shard samples and --max-shard-bytes bytes (the
  exact tar size is computed from the file sizes; a single larger sample gets a shard of its own).
* Write: shards are written in parallel (--workers processes) with webdataset's `TarWriter`, with
  fixed member metadata (mtime 0, uid/gid 0, user/group "llava", mode 0444, USTAR format), so the
  same input gives byte-identical shards and manifest. Each shard is written as
  `shard-NNNNNN.tar.tmp` and renamed when complete; then its `.done` marker is written.
* Resume: re-running the same command skips every shard whose `.done` marker matches the planned
  content (fingerprint over keys, records and image paths/sizes/mtimes) and the file size; any
  other shard (missing, partial, stale, planned differently) is rewritten; stale `.tmp` files and
  shards beyond the plan are removed. `manifest.json` is written last (also via rename), so its
  presence means the conversion completed.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import multiprocessing
import os
import random
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from llava_sft.data.dataset import image_list, read_records
from llava_sft.data.templates import BadSampleError

FORMAT = "llava_sft.shards/1"
SHARD_NAME = "shard-{:06d}.tar"
SHARD_RE = re.compile(r"^shard-(\d{6})\.tar(\.done|\.tmp)?$")
KEY_DIGITS = 9
TAR_BLOCK, TAR_RECORD = 512, 10240
TAR_META = {"user": "llava", "group": "llava", "mode": 0o444, "mtime": 0}

log = logging.getLogger("make_shards")


class ConversionError(ValueError):
    """Bad input (missing/unreadable images, bad records), naming the samples."""


@dataclass(frozen=True)
class Item:
    """One sample to write: its key, its JSON bytes and its image files."""

    index: int
    sample_id: str
    json_bytes: bytes
    images: tuple[tuple[str, str, int, int], ...]  # (path as in the record, extension, size, mtime_ns)

    @property
    def key(self) -> str:
        return f"{self.index:0{KEY_DIGITS}d}"

    def members(self) -> list[tuple[str, int]]:
        """(member name, size) in the order TarWriter writes them (sorted by field name)."""
        fields = {"json": len(self.json_bytes)}
        fields.update({f"{k}.{ext}": size for k, (_, ext, size, _) in enumerate(self.images)})
        return [(f"{self.key}.{name}", fields[name]) for name in sorted(fields)]


def image_extension(name: str) -> str:
    ext = re.sub(r"[^a-z0-9]", "", Path(name).suffix.lower())
    return ext or "img"


def _member_bytes(item: Item) -> int:
    return sum(TAR_BLOCK + -(-n // TAR_BLOCK) * TAR_BLOCK for _, n in item.members())


def _tar_total(member_bytes: int) -> int:
    """Tar file size from the members' header+data bytes: end-of-archive blocks, padded to a record."""
    return -(-(member_bytes + 2 * TAR_BLOCK) // TAR_RECORD) * TAR_RECORD


def tar_bytes(items: list[Item]) -> int:
    """Exact size of the tar that TarWriter ("w|", USTAR) writes for these items."""
    return _tar_total(sum(_member_bytes(item) for item in items))


def fingerprint(items: list[Item]) -> str:
    h = hashlib.sha256(FORMAT.encode())
    for item in items:
        h.update(item.key.encode() + b"\0" + hashlib.sha256(item.json_bytes).digest())
        for path, ext, size, mtime in item.images:
            h.update(f"\0{path}\0{ext}\0{size}\0{mtime}".encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- check
def _check_image(folder: Path, name: str, verify: bool) -> tuple[int, int] | str:
    """(size, mtime_ns) of a readable image file, or the reason it is bad."""
    path = folder / name
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return f"missing image file: {path}"
    except OSError as e:
        return f"unreadable image file: {path} ({type(e).__name__}: {e})"
    if not os.path.isfile(path):
        return f"missing image file (not a regular file): {path}"
    if not os.access(path, os.R_OK):
        return f"unreadable image file: {path} (no read permission)"
    if verify:
        from PIL import Image

        try:
            with Image.open(path) as image:
                image.verify()
        except Exception as e:  # PIL raises many kinds for corrupt files
            return f"corrupt image: {path} ({type(e).__name__}: {e})"
    return st.st_size, st.st_mtime_ns


def _image_list(record: dict) -> list[str] | None:
    """The record's image paths as training reads them (llava_sft.data.dataset.image_list); None if invalid."""
    try:
        return image_list(record)
    except BadSampleError:
        return None


def check_records(records: list, folder: Path, threads: int, verify: bool) -> tuple[list[Item], list[dict]]:
    """-> (good items in file order, bad samples [{"index", "id", "reason", "missing_images"}])."""
    parsed, bad = [], []
    for i, record in enumerate(records):
        sample_id = record.get("id", f"#{i}") if isinstance(record, dict) else f"#{i}"
        if not isinstance(record, dict) or "conversations" not in record:
            bad.append({"index": i, "id": str(sample_id), "reason": "not a record with 'conversations'"})
            continue
        names = _image_list(record)
        if names is None:
            bad.append({"index": i, "id": str(sample_id), "reason": "bad 'image' field: expected a path or a list "
                        f"of paths, got {record['image']!r}"})
            continue
        if "id" not in record:
            record = {"id": sample_id, **record}  # as LlavaJsonDataset names it
        parsed.append((i, str(sample_id), record, names))

    unique = sorted({name for _, _, _, names in parsed for name in names})
    with ThreadPoolExecutor(max(1, threads)) as pool:
        status = dict(zip(unique, pool.map(lambda n: _check_image(folder, n, verify), unique, chunksize=256), strict=True))

    items = []
    for i, sample_id, record, names in parsed:
        problems = [status[n] for n in names if isinstance(status[n], str)]
        if problems:
            bad.append({"index": i, "id": sample_id, "reason": "; ".join(problems),
                        "missing_images": sum(p.startswith("missing") for p in problems)})
            continue
        images = tuple((n, image_extension(n), *status[n]) for n in names)
        json_bytes = json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        items.append(Item(i, sample_id, json_bytes, images))
    bad.sort(key=lambda b: b["index"])
    return items, bad


# ---------------------------------------------------------------------------- plan
def plan_shards(items: list[Item], samples_per_shard: int, max_shard_bytes: int | None) -> list[list[Item]]:
    shards, current, size = [], [], 0
    for item in items:
        n = _member_bytes(item)
        if current and (len(current) >= samples_per_shard
                        or (max_shard_bytes is not None and _tar_total(size + n) > max_shard_bytes)):
            shards.append(current)
            current, size = [], 0
        current.append(item)
        size += n
    if current:
        shards.append(current)
    return shards


# --------------------------------------------------------------------------- write
class _HashingFile:
    """Write-only file wrapper that hashes and counts what goes through it."""

    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.f.write(data)


def _shard_stats(items: list[Item]) -> dict:
    with_image = sum(bool(item.images) for item in items)
    return {"samples": len(items), "with_image": with_image, "text_only": len(items) - with_image,
            "images": sum(len(item.images) for item in items)}


def write_shard(job: tuple[Path, Path, str, list[Item], str]) -> dict:
    """Write one shard (temp file + rename + .done marker); -> its manifest entry."""
    from webdataset import TarWriter

    out, folder, name, items, fp = job
    final, tmp = out / name, out / (name + ".tmp")
    with open(tmp, "wb") as f:
        hashing = _HashingFile(f)
        with TarWriter(hashing, encoder=False, **TAR_META) as writer:
            for item in items:
                sample = {"__key__": item.key, "json": item.json_bytes}
                for k, (path, ext, size, _) in enumerate(item.images):
                    try:
                        data = (folder / path).read_bytes()
                    except OSError as e:
                        raise ConversionError(f"sample {item.sample_id!r}: cannot read image {folder / path} "
                                              f"({type(e).__name__}: {e})") from None
                    if len(data) != size:
                        raise ConversionError(f"sample {item.sample_id!r}: image {folder / path} changed during "
                                              f"the conversion ({size} -> {len(data)} bytes)")
                    sample[f"{k}.{ext}"] = data
                writer.write(sample)
        f.flush()
        os.fsync(f.fileno())
    expected = tar_bytes(items)
    if hashing.size != expected:
        raise RuntimeError(f"{name}: wrote {hashing.size} bytes, planned {expected}")
    os.replace(tmp, final)
    entry = {"name": name, **_shard_stats(items), "bytes": hashing.size, "sha256": hashing.sha.hexdigest()}
    _write_atomic(out / (name + ".done"), json.dumps({**entry, "fingerprint": fp}, indent=1) + "\n")
    return entry


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _completed(out: Path, name: str, fp: str) -> dict | None:
    """The manifest entry of an already complete shard matching the plan, else None."""
    try:
        done = json.loads((out / (name + ".done")).read_text())
        if done.get("fingerprint") == fp and (out / name).stat().st_size == done["bytes"]:
            return {k: done[k] for k in ("name", "samples", "with_image", "text_only", "images", "bytes", "sha256")}
    except (OSError, ValueError, KeyError):
        pass
    return None


# ------------------------------------------------------------------------- convert
def convert(data: str | Path, image_folder: str | Path, out: str | Path, samples_per_shard: int = 1000,
            max_shard_bytes: int | None = None, workers: int = 4, seed: int = 0, shuffle: bool = True,
            skip_bad: bool = False, verify_images: bool = False) -> dict:
    """Convert (or resume converting) `data` into shards under `out`; -> the manifest."""
    data, folder, out = Path(data), Path(image_folder), Path(out)
    if samples_per_shard < 1:
        raise ValueError("--samples-per-shard must be >= 1")
    raw = data.read_bytes()
    try:
        records = read_records(data)  # a JSON list or JSONL
    except ValueError as e:
        raise ConversionError(str(e)) from e
    log.info("%s: checking %d records and their image files", data, len(records))
    items, bad = check_records(records, folder, threads=4 * max(1, workers), verify=verify_images)
    if bad and not skip_bad:
        listing = "\n".join(f"  - sample {b['id']!r} (record {b['index']}): {b['reason']}" for b in bad[:20])
        more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
        raise ConversionError(f"{data}: {len(bad)} bad sample(s) (use --skip-bad to skip them and list them "
                              f"in the manifest):\n{listing}{more}")
    for b in bad:
        log.warning("skipping sample %r (record %d): %s", b["id"], b["index"], b["reason"])
    if not items:
        raise ConversionError(f"{data}: no sample to write")
    if shuffle:
        random.Random(seed).shuffle(items)
    shards = plan_shards(items, samples_per_shard, max_shard_bytes)
    names = [SHARD_NAME.format(i) for i in range(len(shards))]

    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(out.iterdir()):  # stale temp files, and shards of an earlier, longer plan
        m = SHARD_RE.match(path.name)
        if path.name.endswith(".tmp") or (m and int(m.group(1)) >= len(shards)):
            log.warning("removing stale %s", path)
            path.unlink()
    (out / "manifest.json").unlink(missing_ok=True)  # rewritten last: its presence means complete

    entries: dict[str, dict] = {}
    jobs = []
    for name, shard in zip(names, shards, strict=True):
        fp = fingerprint(shard)
        done = _completed(out, name, fp)
        if done is not None:
            entries[name] = done
        else:
            jobs.append((out, folder, name, shard, fp))
    log.info("%d shards planned, %d already complete, %d to write", len(shards), len(entries), len(jobs))
    if jobs:
        import webdataset  # noqa: F401  (imports torch: once here rather than in every forked worker)
    if workers > 1 and len(jobs) > 1:
        with multiprocessing.get_context("fork").Pool(min(workers, len(jobs))) as pool:
            for entry in pool.imap_unordered(write_shard, jobs):
                entries[entry["name"]] = entry
                log.info("wrote %s (%d samples)", entry["name"], entry["samples"])
    else:
        for job in jobs:
            entry = write_shard(job)
            entries[entry["name"]] = entry
            log.info("wrote %s (%d samples)", entry["name"], entry["samples"])

    shard_entries = [entries[name] for name in names]
    totals = {"shards": len(shards)}
    for k in ("samples", "with_image", "text_only", "images", "bytes"):
        totals[k] = sum(e[k] for e in shard_entries)
    totals["bad_samples"] = len(bad)
    totals["missing_images"] = sum(b.get("missing_images", 0) for b in bad)
    manifest = {
        "format": FORMAT,
        "source": {"data": data.name, "data_sha256": hashlib.sha256(raw).hexdigest(), "records": len(records)},
        "options": {"samples_per_shard": samples_per_shard, "max_shard_bytes": max_shard_bytes,
                    "shuffle": shuffle, "seed": seed, "skip_bad": skip_bad},
        "totals": totals,
        "shards": shard_entries,
        "bad_samples": [{k: b[k] for k in ("index", "id", "reason")} for b in bad],
    }
    _write_atomic(out / "manifest.json", json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="LLaVA-format JSON")
    parser.add_argument("--image-folder", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="shard directory")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--max-shard-bytes", type=int, default=None)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0, help="seed of the record permutation before sharding")
    parser.add_argument("--no-shuffle", action="store_true", help="keep the JSON order")
    parser.add_argument("--skip-bad", action="store_true", help="skip bad samples and list them in the manifest")
    parser.add_argument("--verify-images", action="store_true", help="also open and verify every image with PIL")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        manifest = convert(args.data, args.image_folder, args.out, args.samples_per_shard, args.max_shard_bytes,
                           args.workers, args.seed, not args.no_shuffle, args.skip_bad, args.verify_images)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(manifest["totals"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
