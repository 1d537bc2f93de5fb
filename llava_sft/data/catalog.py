"""The start-up pass over a LLaVA JSON / JSONL file: done once per node, cached, and stored flat.

It finds, before the first step, every sample the loader would fail on later (issue 14: a truncated JPEG used to
stop the run at the step that reached it, possibly hour 19, and the resumed run hit it again):
  structure  roles, turn count, `<image>` count vs images, empty replies, duplicate ids (`ChatTemplate.render`)
  text       the template's markers or special tokens inside a turn (data.control_strings)
  length     the over-long policy (data.overlong) on the exact token count: samples `drop` would drop, and
             samples that `truncate` cannot fit (images past max_length, or a first human turn so long that no
             supervised token is left)
  images     data.check_images_at_start: `header` (default: each file opened and its header parsed -- 0-byte,
             non-image and decompression-bomb files), `decode` (every pixel decoded, as the loader does -- also
             truncated files), `stat` (the file exists), `off`; checked by a thread pool

Length without tokenizing every conversation: `tokenize_conversation` costs 3.7 ms per mix665K-like sample (a
LlamaTokenizerFast, this project's 2-core Xeon) -- 41 minutes for 665K samples. The token count of a text is at
most its UTF-8 byte count plus a few tokens per tokenizer call (BOS/EOS, SentencePiece's dummy prefix), because
each token of a byte-level BPE or a byte-fallback SentencePiece model covers at least one byte. Samples whose
bound fits max_length therefore fit; only the others are tokenized, and only those over the limit go through the
full masking tokenization and `fit_length`, exactly as the loader will. The bound is checked, not trusted: the
first CALIBRATION samples are tokenized too, and a tokenizer that ever exceeds it (a normaliser that expands text)
makes the pass tokenize every sample, saying so. From PARALLEL_FROM records on, these text checks run in forked
processes, one per core (the recipes' slow SentencePiece tokenizer costs ~4 ms per sample it counts).

Sharing: the records are stored as one buffer of JSON bytes plus offsets (numpy), memory-mapped from the cache.
A Python list of dicts is copied page by page into every forked DataLoader worker as reference counts are touched
(1.15 GiB private memory per worker at 665K records, issue 16); numpy buffers have no per-record reference counts.

Cache: `<cache_dir>/<key>/` where the key hashes the data file (path, size, mtime, sha256), the image folder's
path, the tokenizer (its full definition), the template and every setting above. The first process of a node
builds it under a file lock; the other ranks, and the next run, memory-map it. Image problems are never taken from
the cache: those samples are checked again on every start (a fixed image is picked up). An image that broke after
the cache was built is found when loaded, under data.bad_samples (data.startup_cache=false rebuilds every time).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import multiprocessing as mp
import os
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from llava_sft.constants import IMAGE_PLACEHOLDER
from llava_sft.data.anyres import image_token_counts
from llava_sft.data.templates import BadSampleError, ChatTemplate
from llava_sft.preemption import ignore_in_worker

log = logging.getLogger(__name__)

IMAGE_CHECKS = ("header", "decode", "stat", "off")
CALIBRATION = 256  # samples always tokenized, to check the token-count bound on this tokenizer
PARALLEL_FROM = 5000  # records from which the text checks run in forked worker processes
FORMAT = 2  # bump when the cached layout, the checks or the tokenization change (2: tokenize_with_images BOS rule)
OK, BAD, BAD_IMAGE = 0, 1, 2  # per-record state; BAD_IMAGE is re-checked on every start


@dataclass(frozen=True)
class StartupSettings:
    """Everything the start-up result depends on besides the files."""

    template: ChatTemplate
    tokenizer: object
    tokens_per_image: int
    max_length: int
    overlong: str
    control_strings: str
    check_images: str
    anyres: object = None  # data/anyres.AnyRes: each image's token count from its size (read from its header)
    pairs: bool = False  # preference pairs (data/preference.py): both sides are checked, each as a conversation


# ------------------------------------------------------------------------------ the result
class Catalog:
    """The samples of a data file after the start-up pass, in flat arrays: record `i` is
    `json.loads(blob[offsets[i]:offsets[i + 1]])`; `state[i]` is OK, BAD or BAD_IMAGE with `problems[i]` the reason."""

    def __init__(self, blob, offsets, approx, n_images, state, meta: dict):
        self.blob, self.offsets, self.approx, self.n_images, self.state = blob, offsets, approx, n_images, state
        self.meta = meta  # problems {index: [id, reason]}, kept_with_control_strings, will_truncate, ...

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def record(self, i: int) -> dict:
        return json.loads(self.blob[self.offsets[i]:self.offsets[i + 1]].tobytes())

    def problems(self) -> list[BadSampleError]:
        return [BadSampleError(sid, reason) for _, (sid, reason) in sorted(self.meta["problems"].items(),
                                                                           key=lambda kv: int(kv[0]))]

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True)
        self.blob.tofile(directory / "records.bin")
        np.save(directory / "offsets.npy", self.offsets)
        np.save(directory / "approx.npy", self.approx)
        np.save(directory / "n_images.npy", self.n_images)
        np.save(directory / "state.npy", self.state)
        (directory / "meta.json").write_text(json.dumps(self.meta))
        for path in directory.iterdir():  # complete on disk before the rename makes it visible
            with open(path, "rb") as f:
                os.fsync(f.fileno())

    @classmethod
    def load(cls, directory: Path) -> "Catalog":
        size = (directory / "records.bin").stat().st_size
        blob = np.memmap(directory / "records.bin", dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
        arrays = [np.load(directory / f"{name}.npy", mmap_mode="r") for name in ("offsets", "approx", "n_images")]
        state = np.load(directory / "state.npy")  # small and re-checked: a private copy
        return cls(blob, *arrays, state, json.loads((directory / "meta.json").read_text()))


# ------------------------------------------------------------------------------ building
def token_bound(text: str) -> int:
    """An upper bound on len(tokenize_with_images(text)) for byte-level tokenizers (module docstring): per
    `<image>`-separated chunk its UTF-8 bytes plus 3 (BOS, EOS, dummy prefix), plus one id per image."""
    chunks = text.split(IMAGE_PLACEHOLDER)
    return sum(len(c.encode("utf-8")) + 3 for c in chunks) + len(chunks) - 1


@dataclass
class Checked:
    """One record after the text checks (what a worker process sends back: no texts, a few numbers)."""

    problem: BadSampleError | None = None
    images: tuple[str, ...] = ()
    approx: int = 0
    control: bool = False  # holds control strings (kept under data.control_strings=keep)
    tokenized: bool = False
    above_bound: bool = False  # more tokens than token_bound: the bound does not hold for this tokenizer
    truncate: bool = False  # longer than max_length; truncation keeps it


_JOB: tuple | None = None  # (records, settings, exact, image folder) for forked workers: inherited, not pickled


def check_record(i: int, exact: bool = False) -> Checked:
    """Structure, control strings and the length policy of record `i` of the job's records."""
    from llava_sft.data.dataset import control_string_problem, fit_length, image_list  # dataset imports us
    from llava_sft.data.preference import last_reply_only, pair_conversations
    from llava_sft.data.tokenize import tokenize_conversation, tokenize_segments, tokenize_with_images

    records, s, folder = _JOB[0], _JOB[1], _JOB[3]
    record = records[i]
    sample_id = record.get("id", f"#{i}") if isinstance(record, dict) else f"#{i}"
    out = Checked()
    try:
        if not isinstance(record, dict) or "conversations" not in record:
            raise BadSampleError(sample_id, "not a record with 'conversations'")
        names = image_list(record, sample_id)
        sides = pair_conversations(record, sample_id) if s.pairs else [record["conversations"]]
        counts = image_token_counts(image_sizes(names, folder, sample_id) if s.anyres else names,
                                    s.tokens_per_image, s.anyres)
        for conversations in sides:  # a preference pair: each side as the sample it will be, both in one unit
            segments = s.template.render(conversations, num_images=len(names), sample_id=sample_id)
            problem = control_string_problem(conversations, s.template, s.tokenizer)
            if problem and s.control_strings == "refuse":
                raise BadSampleError(sample_id, problem)
            out.control, out.images = out.control or bool(problem), tuple(names)
            out.approx += (sum(len(t["value"].split()) for t in conversations)
                           + sum(counts))  # LLaVA's length estimate for batching by length
            text, extra = "".join(seg.text for seg in segments), sum(c - 1 for c in counts)
            bound = token_bound(text)
            if exact or i < CALIBRATION or bound + extra > s.max_length:  # the bound does not settle it: count
                out.tokenized = True
                length = len(tokenize_with_images(text, s.tokenizer))
                out.above_bound = out.above_bound or length > bound
                if length + extra > s.max_length:  # over the limit: exactly what the loader will do with it
                    ids, labels = (tokenize_segments(last_reply_only(segments), s.tokenizer, sample_id) if s.pairs
                                   else tokenize_conversation(conversations, s.tokenizer, s.template,
                                                              num_images=len(names), sample_id=sample_id))
                    fit_length(ids, labels, s.max_length, counts, s.overlong, sample_id)
                    out.truncate = True
    except BadSampleError as e:
        out.problem = e
    return out


def image_sizes(names: list[str], folder: Path, sample_id) -> list:
    """AnyRes: an image alone in its sample is tiled by its size, read from its header (no decoding); several
    images in one sample get one view each (None)."""
    if len(names) != 1:
        return [None] * len(names)
    try:
        with Image.open(folder / names[0]) as image:
            return [image.size]
    except FileNotFoundError:
        raise BadSampleError(sample_id, f"missing image file: {folder / names[0]}") from None
    except Exception as e:  # PIL raises many kinds for unreadable headers
        raise BadSampleError(sample_id, f"corrupt image: {folder / names[0]} ({type(e).__name__}: {e})") from None


def _check_range(bounds: tuple[int, int]) -> list[Checked]:
    return [check_record(i, _JOB[2]) for i in range(*bounds)]


def _init_worker() -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # a forked fast tokenizer must not start its own threads
    ignore_in_worker()  # a SIGTERM to the process group is the rank's to answer (llava_sft/preemption.py)


class StartupCheckError(RuntimeError):
    """The start-up check could not run or be shared: one line naming the cause and the fix."""


def check_workers() -> int:
    """Processes for the text checks: one per core, up to 32, or LLAVA_SFT_CHECK_WORKERS (fewer when memory is
    short: each is a fork of the rank)."""
    return int(os.environ.get("LLAVA_SFT_CHECK_WORKERS") or min(32, os.cpu_count() or 1))


def check_all(indices: list[int], exact: bool) -> dict[int, Checked]:
    """check_record over `indices`, in forked processes when there are many: the slow SentencePiece tokenizer of
    the recipes costs ~4 ms per sample it has to count.

    A ProcessPoolExecutor, not a multiprocessing Pool: when a worker dies (the OOM killer), Pool.map never returns,
    and the rank held the node's cache lock while every other rank waited (issue 38); the executor marks its
    futures broken, which is an error here. Its shutdown joins workers that exit on their own (Pool.terminate()
    once hung for 37 minutes: a worker blocked on the task queue's lock; py-spy, 2026-11-30)."""
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    workers = check_workers()
    if len(indices) < PARALLEL_FROM or workers < 2 or "fork" not in mp.get_all_start_methods():
        return {i: check_record(i, exact) for i in indices}
    step = max(256, len(indices) // (workers * 8))
    ranges = [(indices[k], indices[min(k + step, len(indices)) - 1] + 1) for k in range(0, len(indices), step)]
    try:
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"), initializer=_init_worker) as pool:
            results = list(pool.map(_check_range, ranges))
    except BrokenProcessPool as e:
        raise StartupCheckError(
            f"a worker process of the start-up check died ({e}): most often the kernel's OOM killer (see dmesg); "
            f"each of the {workers} workers is a fork of this rank: set LLAVA_SFT_CHECK_WORKERS to fewer, or give "
            f"the job more memory") from None
    wanted = set(indices)
    return {i: r for (a, b), chunk in zip(ranges, results, strict=True) for i, r in zip(range(a, b), chunk, strict=True)
            if i in wanted}


def build(records: list, image_folder: Path, s: StartupSettings) -> Catalog:
    global _JOB
    t0 = time.time()
    n = len(records)
    problems: dict[int, BadSampleError] = {}
    first_at = {}
    for i, record in enumerate(records):  # ids name samples in skip reports, errors and resume: must be unique
        if isinstance(record, dict):
            sample_id = str(record.setdefault("id", f"#{i}"))  # no id: named by its position in the file
            if sample_id in first_at:
                problems[i] = BadSampleError(record["id"], f"duplicate id (record #{i}; the first was record "
                                                           f"#{first_at[sample_id]})")
            first_at.setdefault(sample_id, i)
    _JOB = (records, s, False, image_folder)
    try:
        checked = check_all([i for i in range(n) if i not in problems], exact=False)
        over = next((i for i in sorted(checked) if checked[i].above_bound), None)
        if over is not None:  # the bound does not hold for this tokenizer (module docstring): count every sample
            log.warning("the tokenizer gives more tokens than the start-up bound for sample %r: tokenizing every "
                        "sample at start-up", records[over]["id"])
            _JOB = (records, s, True, image_folder)
            checked.update(check_all([i for i in checked if not checked[i].tokenized], exact=True))
    finally:
        _JOB = None
    t_text = time.time() - t0
    approx, n_images = np.zeros(n, np.int32), np.zeros(n, np.int16)
    for i, c in checked.items():
        approx[i], n_images[i] = c.approx, len(c.images)
        if c.problem is not None:
            problems[i] = c.problem
    state = np.full(n, OK, np.int8)
    for i in problems:
        state[i] = BAD
    image_problems = check_images({i: list(c.images) for i, c in checked.items() if i not in problems},
                                  image_folder, s.check_images, records)
    for i, e in image_problems.items():
        problems[i], state[i] = e, BAD_IMAGE
    t_images = time.time() - t0 - t_text

    blobs = [json.dumps(r, ensure_ascii=False).encode("utf-8") if isinstance(r, dict) else b"{}" for r in records]
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum([len(b) for b in blobs], out=offsets[1:])
    blob = np.frombuffer(b"".join(blobs), dtype=np.uint8)
    meta = {"problems": {str(i): [str(e.sample_id), e.reason] for i, e in problems.items()},
            "kept_with_control_strings": sum(c.control for i, c in checked.items() if i not in problems),
            "will_truncate": sum(c.truncate for c in checked.values() if c.problem is None),
            "tokenized_at_start": sum(c.tokenized for c in checked.values()), "tokenized_every_sample": over is not None,
            "seconds": {"text_and_length": round(t_text, 2), "images": round(t_images, 2),
                        "store": round(time.time() - t0 - t_text - t_images, 2)}}
    return Catalog(blob, offsets, approx, n_images, state, meta)


def check_images(images: dict[int, list[str]], folder: Path, mode: str, records) -> dict[int, BadSampleError]:
    """{record index: BadSampleError} for records whose first bad image fails `mode` (IMAGE_CHECKS)."""
    if mode == "off":
        return {}
    if mode not in IMAGE_CHECKS:
        raise ValueError(f"data.check_images_at_start must be one of {', '.join(IMAGE_CHECKS)}, got {mode!r}")
    names = sorted({name for group in images.values() for name in group})
    workers = min(32, 4 * (os.cpu_count() or 1)) if mode != "decode" else (os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:  # file I/O and PIL's decoders release the GIL
        results = dict(zip(names, pool.map(lambda name: image_problem(folder / name, mode), names, chunksize=64),
                           strict=True))
    out = {}
    for i, group in images.items():
        bad = next((results[name] for name in group if results[name]), None)
        if bad:
            out[i] = BadSampleError(records[i]["id"], bad)
    return out


def image_problem(path: Path, mode: str) -> str | None:
    """Why the loader would fail on this image file, or None (the messages are the loader's: dataset._load_image)."""
    if mode == "stat":
        return None if path.is_file() else f"missing image file: {path}"
    try:
        with Image.open(path) as image:  # parses the header; refuses decompression bombs (PIL's pixel limit)
            if mode == "decode":
                image.load()
    except FileNotFoundError:
        return f"missing image file: {path}"
    except Exception as e:  # PIL raises many kinds for corrupt files
        return f"corrupt image: {path} ({type(e).__name__}: {e})"
    return None


# ------------------------------------------------------------------------------ cache
@lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path) -> str:
    """sha256 of a file's contents (~0.5 s per GB), computed once per process for a given size and mtime."""
    stat = os.stat(path)
    return _sha256(os.path.realpath(path), stat.st_size, stat.st_mtime_ns)


def tokenizer_fingerprint(tokenizer) -> str:
    """The tokenizer's full definition (vocabulary, merges, normaliser, added tokens), hashed."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()
    else:
        vocab_file = getattr(tokenizer, "vocab_file", None)
        text = Path(vocab_file).read_bytes().hex() if vocab_file and Path(vocab_file).is_file() else \
            json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = [type(tokenizer).__name__, getattr(tokenizer, "add_bos_token", None),
             getattr(tokenizer, "add_eos_token", None), getattr(tokenizer, "legacy", None),
             [str(t) for t in tokenizer.all_special_tokens], len(tokenizer)]
    return hashlib.sha256((text + json.dumps(extra, default=str)).encode()).hexdigest()


def cache_key(json_path: Path, image_folder: Path, s: StartupSettings) -> str:
    stat = json_path.stat()
    parts = [FORMAT, str(json_path.resolve()), stat.st_size, stat.st_mtime_ns, file_sha256(json_path),
             str(Path(image_folder).resolve()), tokenizer_fingerprint(s.tokenizer), repr(s.template),
             s.tokens_per_image, s.max_length, s.overlong, s.control_strings, s.check_images, repr(s.anyres)]
    parts += ["pairs"] if s.pairs else []  # an SFT file's key is as it was
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:24]


def default_cache_dir() -> Path:
    return Path(os.environ.get("LLAVA_SFT_CACHE") or Path.home() / ".cache" / "llava_sft") / "startup"


def prepare(json_path, image_folder, s: StartupSettings, cache_dir: str | None = None, use_cache: bool = True,
            read=None) -> Catalog:
    """The catalog of `json_path`: from the cache when it holds one for these files and settings, else built
    (under a lock, by the first process of the node; the others wait and load it). `read`: the file reader."""
    json_path, image_folder = Path(json_path), Path(image_folder)
    if not use_cache:
        return _fresh(json_path, image_folder, s, read)
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock_file = open(root / ".lock", "a+")  # noqa: SIM115 (held for the whole build)
    except OSError as e:
        log.warning("start-up cache %s is not usable (%s): every process checks the data itself; set "
                    "data.cache_dir to a writable directory to check once per node", root, e)
        return _fresh(json_path, image_folder, s, read)
    key = cache_key(json_path, image_folder, s)
    target = root / key
    with lock_file:
        if not (target / "DONE").is_file():
            waited_since = time.time()
            try:
                waited = _lock(lock_file, root, json_path)
            except OSError as e:  # a file system without locks (some NFS mounts): no sharing, no race either
                log.warning("start-up cache %s cannot be locked (%s): every process checks the data itself; set "
                            "data.cache_dir to a local directory to check once per node", root, e)
                return _fresh(json_path, image_folder, s, read)
            try:
                if not (target / "DONE").is_file():
                    # only a build this process waited for: an old marker never fails a later start
                    failed = _failure_since(root, key, waited_since) if waited else None
                    if failed:  # never a serial rebuild by every waiting rank: the cause, at once
                        raise StartupCheckError(
                            f"the start-up check of {json_path} was built by another process but could not be stored "
                            f"in {root} ({failed}): free space there or set data.cache_dir to a writable directory "
                            f"(or data.startup_cache=false: every process checks the data itself)")
                    _remove_leftovers(root)
                    _holder(lock_file, json_path)
                    catalog = _fresh(json_path, image_folder, s, read)
                    _store(catalog, root, key, json_path)
                    return catalog
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)
    catalog = Catalog.load(target)
    log.info("%s: start-up check from the cache %s (built for this file, tokenizer and settings)", json_path, target)
    recheck_images(catalog, image_folder, s.check_images)
    return catalog


def _fresh(json_path: Path, image_folder: Path, s: StartupSettings, read) -> Catalog:
    if read is None:
        from llava_sft.data.dataset import read_records  # dataset imports us
        read = read_records
    records = read(json_path)
    log.info("%s: checking %d records (structure, length, control strings; images: %s)", json_path, len(records),
             s.check_images)
    catalog = build(records, image_folder, s)
    log.info("%s: start-up check took %s s (%d of %d samples tokenized)", json_path, catalog.meta["seconds"],
             catalog.meta["tokenized_at_start"], len(records))
    return catalog


LOCK_WAIT_S = 3600.0  # the longest wait for another process's check (LLAVA_SFT_LOCK_WAIT); mix665K: minutes


def _lock(lock_file, root: Path, json_path: Path) -> bool:
    """The node's lock on the cache, waited for at most LLAVA_SFT_LOCK_WAIT seconds, saying who holds it; True when
    another process held it first."""
    bound = float(os.environ.get("LLAVA_SFT_LOCK_WAIT") or LOCK_WAIT_S)
    t0, last_said = time.time(), None
    while True:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return last_said is not None
        except BlockingIOError:
            pass
        waited = time.time() - t0
        if last_said is None or time.time() - last_said >= 60:
            log.info("waiting for %s to finish the start-up check of %s (%s; %.0f s so far)", _read_holder(root),
                     json_path, root, waited)
            last_said = time.time()
        if waited > bound:
            raise StartupCheckError(
                f"waited {waited:.0f} s for the start-up check's lock {root / '.lock'}, held by {_read_holder(root)}: "
                f"if that process is gone (a crash on another host, a stale NFS lock) delete {root / '.lock'}; or "
                f"wait longer (LLAVA_SFT_LOCK_WAIT seconds), or set data.startup_cache=false")
        time.sleep(min(1.0, max(bound - waited, 0.01)))


def _holder(lock_file, json_path: Path) -> None:
    """Write who holds the lock into the lock file (waiting processes name it)."""
    try:
        lock_file.seek(0)
        lock_file.truncate()
        lock_file.write(f"{socket.gethostname()} pid {os.getpid()}, checking {json_path} since "
                        f"{time.strftime('%H:%M:%S')}\n")
        lock_file.flush()
    except OSError:  # a full disk: the lock works without the note
        pass


def _read_holder(root: Path) -> str:
    try:
        return (root / ".lock").read_text().strip() or "another process"
    except OSError:
        return "another process"


def _failure_since(root: Path, key: str, since: float) -> str | None:
    """The reason a build that ended while this process waited could not be stored (its marker), else None."""
    marker = root / f"{key}.failed"
    try:
        st = marker.stat()
    except OSError:
        return None
    if max(st.st_mtime, st.st_ctime) < since - 1:  # ctime: a renamed directory keeps its mtime
        return None
    try:
        return (marker / "REASON").read_text().strip() if marker.is_dir() else marker.read_text().strip()
    except OSError:
        return "no space even to say why: the disk is probably full"


def _remove_leftovers(root: Path) -> None:
    """Temporary directories of builds that crashed (SIGKILL, OOM, a node failure) and old failure markers: those of
    this host whose process is gone, and any older than a day (another host's)."""
    host, removed = socket.gethostname(), []
    for path in root.glob("*.tmp-*"):
        owner_host, _, pid = path.name.split(".tmp-", 1)[1].rpartition("-")
        try:
            stale = time.time() - path.stat().st_mtime > 86400
            if owner_host == host and pid.isdigit():
                stale = stale or not Path(f"/proc/{pid}").exists()
        except OSError:
            continue
        if stale:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    if removed:
        log.info("start-up cache %s: removed %d leftover(s) of crashed builds (%s)", root, len(removed),
                 ", ".join(removed[:3]))
    for marker in root.glob("*.failed"):
        shutil.rmtree(marker, ignore_errors=True) if marker.is_dir() else marker.unlink(missing_ok=True)


def _store(catalog: Catalog, root: Path, key: str, json_path: Path) -> None:
    """Save the catalog under its key (atomically). If that fails, leave a marker saying why, so that the processes
    waiting for it fail at once instead of each rebuilding it in turn under the lock (issue 38)."""
    tmp = root / f"{key}.tmp-{socket.gethostname()}-{os.getpid()}"
    try:
        catalog.save(tmp)
        (tmp / "SOURCE").write_text(f"{json_path.resolve()}\n")
        (tmp / "DONE").write_text("")
        os.replace(tmp, root / key)
    except OSError as e:  # full disk, quota, ...: this process goes on with the catalog it built
        reason = f"{type(e).__name__}: {e}"
        log.warning("could not store the start-up check in %s (%s); it is rebuilt next time", root / key, reason)
        marker = root / f"{key}.failed"
        try:
            marker.write_text(reason + "\n")
        except OSError:  # no space for a file: the partial directory, renamed (no new space needed), is the marker
            try:
                os.replace(tmp, marker)
                (marker / "REASON").write_text(reason + "\n")
            except OSError:
                pass
        shutil.rmtree(tmp, ignore_errors=True)


def recheck_images(catalog: Catalog, image_folder: Path, mode: str) -> None:
    """Samples the cache lists with an image problem, checked again (a fixed or restored image counts again)."""
    flagged = np.flatnonzero(catalog.state == BAD_IMAGE)
    if not len(flagged):
        return
    from llava_sft.data.dataset import image_list

    images = {int(i): image_list(catalog.record(int(i))) for i in flagged}
    still = check_images(images, image_folder, mode, {i: catalog.record(i) for i in images})
    for i in images:
        if i not in still:
            catalog.state[i] = OK
            del catalog.meta["problems"][str(i)]
        else:
            catalog.meta["problems"][str(i)] = [str(still[i].sample_id), still[i].reason]
    if len(still) < len(images):
        log.info("%d sample(s) with an image problem at the last check are fine now", len(images) - len(still))
