"""Dataset memory per DataLoader worker and start-up time at mix665K scale (issue 16, point 2).

    python benchmarks/dataset_memory.py --records 665298 --workers 4 --ranks 8 --json mem.json
    python benchmarks/dataset_memory.py --records 665298 --workers 2 --baseline   # records as Python dicts

Builds a mix665K-shaped LLaVA JSON of `--records` samples (94 % with one image and 1-8 rounds of VQA-like or
detailed turns, 6 % text-only ShareGPT-like long conversations; ~1.1 KB per record, the real file's 729 MB / 665K)
whose images are `--image-files` distinct small JPEGs, and a Vicuna-convention tokenizer trained on the spot (slow
LlamaTokenizer, as the recipes' `tokenizer_use_fast: false`). Then, through the training code path
(`LlavaJsonDataset` with the recipe's settings: vicuna_v1, 576 tokens per image, max_length 2048):

- start-up: `--ranks` processes start at once, as the ranks of a node do, each building its dataset with one
  shared cache directory; `startup_cold_s` is the wall time until all are done with an empty cache (one builds,
  the others wait and load), `startup_warm_s` the same again (the next run, or a restart after pre-emption);
- memory: one process builds its dataset from the cache and iterates one epoch through a DataLoader with
  `--workers` forked workers (persistent, so that their memory can be read when the epoch ends). Each worker
  reads every record of its share (`dataset.records[i]`, what `__getitem__` does first; image decoding and
  tokenization allocate per sample and free it, independent of the dataset size). Reported per worker:
  `worker_private_gib` = Private_Dirty of /proc/PID/smaps_rollup (anonymous pages the worker owns: its own
  allocations plus the parent's pages it copied on write -- what grows with a list of dicts), and
  `worker_file_gib` = Private_Clean (file pages of the memory-mapped cache only this worker touched: page cache,
  shared with any other reader and reclaimable, not the worker's memory).
`--baseline` keeps the records as the list of dicts `json.load` gives (the previous implementation) for comparison.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import shutil
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llava_sft.data.dataset import LlavaJsonDataset, read_records  # noqa: E402
from llava_sft.data.images import ImageProcessor  # noqa: E402
from llava_sft.data.templates import get_template  # noqa: E402
from llava_sft.data.tokenizer_train import demo_corpus, train_llama_tokenizer  # noqa: E402
from llava_sft.model.llava import load_tokenizer  # noqa: E402

TOKENS_PER_IMAGE, MAX_LENGTH = 576, 2048
PROCESSOR = ImageProcessor(336, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711), "pad")


def make_data(out: Path, n: int, image_files: int, seed: int = 0) -> Path:
    path = out / f"mix_{n}.json"
    if path.exists():
        return path
    rng = random.Random(seed)
    lines = demo_corpus(400, seed)
    folder = out / "images" / "coco" / "train2017"
    folder.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    for k in range(image_files):
        target = folder / f"{k:012d}.jpg"
        if not target.exists():
            Image.new("RGB", (64, 48), (k % 256, (k // 256) % 256, 128)).save(target, quality=80)

    def sentences(a, b):
        return " ".join(rng.choice(lines) for _ in range(rng.randint(a, b)))

    with open(path, "w") as f:
        f.write("[")
        for i in range(n):
            text_only = rng.random() < 0.06
            turns = []
            rounds = rng.randint(3, 10) if text_only else rng.choice([1, 1, 2, 3, 4, 5, 8])
            for r in range(rounds):
                question = sentences(1, 2)
                answer = sentences(4, 12) if text_only else (sentences(1, 2) if rounds > 2 else sentences(2, 8))
                if r == 0 and not text_only:
                    question = "<image>\n" + question
                turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
            record = {"id": f"{i:09d}", "conversations": turns}
            if not text_only:
                record["image"] = f"coco/train2017/{rng.randrange(image_files):012d}.jpg"
            f.write(("," if i else "") + json.dumps(record))
        f.write("]")
    return path


def make_dataset(data: Path, tokenizer_dir: Path, cache: Path, check: str):
    tokenizer = load_tokenizer(str(tokenizer_dir), use_fast=False)
    return LlavaJsonDataset(data, data.parent / "images", tokenizer, get_template("vicuna_v1"), PROCESSOR,
                            TOKENS_PER_IMAGE, MAX_LENGTH, check_images=check, cache_dir=str(cache))


def _rank(data, tokenizer_dir, cache, check, queue):
    t0 = time.time()
    dataset = make_dataset(data, tokenizer_dir, cache, check)
    queue.put((time.time() - t0, len(dataset)))


def startup(data: Path, tokenizer_dir: Path, cache: Path, check: str, ranks: int) -> tuple[float, list[float]]:
    ctx = mp.get_context("spawn")  # fresh interpreters, as torchrun starts them
    queue = ctx.Queue()
    t0 = time.time()
    procs = [ctx.Process(target=_rank, args=(data, tokenizer_dir, cache, check, queue)) for _ in range(ranks)]
    for p in procs:
        p.start()
    results = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    return time.time() - t0, sorted(round(t, 2) for t, _ in results)


class Touch:
    """Each index -> its record and every turn of it read (what LlavaJsonDataset.__getitem__ does before the image
    and the tokenizer)."""

    def __init__(self, records):
        self.records = records

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):  # every turn's text, as the template's render reads it
        return sum(len(turn["value"]) + len(turn["from"]) for turn in self.records[i]["conversations"])


def smaps(pid: int) -> dict[str, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        fields[key] = int(value.split()[0]) / 2**20  # kB -> GiB
    return fields


def worker_memory(records, workers: int) -> list[dict]:
    from torch.utils.data import DataLoader

    loader = DataLoader(Touch(records), batch_size=256, num_workers=workers, persistent_workers=True,
                        collate_fn=lambda batch: sum(batch), multiprocessing_context="fork")
    assert sum(loader) > 0
    children = [c for c in psutil.Process().children()  # the DataLoader's workers (not multiprocessing's tracker)
                if "resource_tracker" not in " ".join(c.cmdline())]
    assert len(children) == workers, [c.cmdline() for c in children]
    out = [{"pid": c.pid, "private_gib": round(smaps(c.pid)["Private_Dirty"], 3),
            "file_gib": round(smaps(c.pid)["Private_Clean"], 3)} for c in children]
    del loader
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=665298)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--image-files", type=int, default=20000)
    ap.add_argument("--check-images", default="header")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/llava_sft_dataset_memory"))
    ap.add_argument("--baseline", action="store_true", help="records as a list of dicts (the previous way)")
    ap.add_argument("--no-startup", action="store_true", help="skip the start-up timing (reuse the cache)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data = make_data(args.workdir, args.records, args.image_files)
    tokenizer_dir = args.workdir / "tokenizer"
    if not (tokenizer_dir / "tokenizer.model").exists():
        train_llama_tokenizer(demo_corpus(400), tokenizer_dir)
    print(f"data: {data} ({data.stat().st_size / 2**20:.0f} MiB, {args.records} records), made in "
          f"{time.time() - t0:.0f} s", flush=True)
    result = {"records": args.records, "workers": args.workers, "ranks": args.ranks, "baseline": args.baseline,
              "json_mib": round(data.stat().st_size / 2**20), "check_images": args.check_images,
              "cpu": _cpu(), "cores": os.cpu_count()}
    cache = args.workdir / "cache"
    if not args.baseline and args.no_startup:
        records = make_dataset(data, tokenizer_dir, cache, args.check_images).records
    elif not args.baseline:
        shutil.rmtree(cache, ignore_errors=True)
        result["startup_cold_s"], result["cold_per_rank_s"] = startup(data, tokenizer_dir, cache, args.check_images,
                                                                      args.ranks)
        print(f"start-up, {args.ranks} ranks, empty cache: {result['startup_cold_s']:.1f} s", flush=True)
        result["startup_warm_s"], result["warm_per_rank_s"] = startup(data, tokenizer_dir, cache, args.check_images,
                                                                      args.ranks)
        result["startup_s"] = result["startup_warm_s"]
        print(f"start-up, {args.ranks} ranks, cached: {result['startup_warm_s']:.1f} s", flush=True)
        [built] = [d for d in cache.iterdir() if d.is_dir()]
        result["cache_mib"] = round(sum(f.stat().st_size for f in built.iterdir()) / 2**20)
        result["build_seconds"] = json.loads((built / "meta.json").read_text())["seconds"]
        result["tokenized_at_start"] = json.loads((built / "meta.json").read_text())["tokenized_at_start"]
        records = make_dataset(data, tokenizer_dir, cache, args.check_images).records
    else:
        t = time.time()
        records = read_records(data)
        result["startup_s"] = round(time.time() - t, 2)
    result["parent_rss_gib"] = round(psutil.Process().memory_info().rss / 2**30, 3)
    workers = worker_memory(records, args.workers)
    result["worker_private_gib"] = [w["private_gib"] for w in workers]
    result["worker_file_gib"] = [w["file_gib"] for w in workers]
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "?"


if __name__ == "__main__":
    main()
