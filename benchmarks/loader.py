"""Data-loader throughput (decode + preprocess + tokenize + collate), to size data.num_workers.

    python benchmarks/loader.py                                  # drawn JPEGs, demo tokenizer, 336 px, workers 0 1 2
    python benchmarks/loader.py --tokenizer /models/vicuna-7b-v1.5 --workers 0 2 4 8 --samples 512
    python benchmarks/loader.py --source shards                  # the same samples read from webdataset shards

Draws `--samples` images at COCO-like sizes (640x480, 480x640, 500x375, 640x427, 427x640) as JPEG (quality
90): coloured shapes over a noise texture, so that decoding costs what a photo's does (a flat image would
decode unrealistically fast). Each sample is a Stage-2 conversation (`vicuna_v1`, one image, 2-4 rounds of
demo sentences); `--text-only` of them have no image. First the cost of each stage in one process (ms per
sample: JPEG decode, `ImageProcessor` = pad to square + resize + crop + normalise, `tokenize_conversation`),
then the DataLoader as the trainer runs it (`LlavaJsonDataset` or `ShardDataset`, `Collator`, batch
`--batch`) for each `--workers` count: steady-state samples/s (timed from the first batch on, so worker
start-up is reported apart) and samples/s per worker.

A training step needs `global_batch_size / world_size` samples per rank: pick num_workers so that
samples/s >= that / seconds per step (with headroom), on the CPU cores each GPU process can have.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader

from llava_sft.data.dataset import Collator, LlavaJsonDataset
from llava_sft.data.images import ImageProcessor
from llava_sft.data.templates import get_template
from llava_sft.data.tokenize import tokenize_conversation
from llava_sft.data.tokenizer_train import demo_corpus, train_llama_tokenizer
from llava_sft.model.llava import load_tokenizer

SIZES = [(640, 480), (480, 640), (500, 375), (640, 427), (427, 640)]
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def draw_image(rng: random.Random, path: Path) -> None:
    w, h = rng.choice(SIZES)
    noise = np.random.default_rng(rng.randrange(2**32)).integers(0, 256, (h // 4, w // 4, 3), dtype=np.uint8)
    image = Image.fromarray(noise).resize((w, h), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(3, 8)):
        x0, y0 = rng.randrange(w - 20), rng.randrange(h - 20)
        box = (x0, y0, min(w, x0 + rng.randint(20, w // 2)), min(h, y0 + rng.randint(20, h // 2)))
        colour = tuple(rng.randrange(256) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    image.save(path, format="JPEG", quality=90)


def make_data(out: Path, n: int, text_only: float, seed: int) -> Path:
    rng = random.Random(seed)
    lines = demo_corpus(400, seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        rounds = [(rng.choice(lines), " ".join(rng.choice(lines) for _ in range(rng.randint(1, 4))))
                  for _ in range(rng.randint(2, 4))]
        conv = []
        for q, a in rounds:
            conv += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        record = {"id": f"s{i}", "conversations": conv}
        if rng.random() >= text_only:
            draw_image(rng, out / "images" / f"{i:06d}.jpg")
            record["image"] = f"{i:06d}.jpg"
            conv[0]["value"] = "<image>\n" + conv[0]["value"]
        records.append(record)
    (out / "data.json").write_text(json.dumps(records))
    return out / "data.json"


def stage_costs(data: Path, tokenizer, processor: ImageProcessor, template) -> dict[str, float]:
    """ms per sample of each stage, in this process."""
    records = json.loads(data.read_text())
    decode = preprocess = tokenize = 0.0
    n_images = 0
    for r in records:
        if "image" in r:
            t0 = time.perf_counter()
            with Image.open(data.parent / "images" / r["image"]) as image:
                image.load()
                t1 = time.perf_counter()
                processor(image)
            t2 = time.perf_counter()
            decode, preprocess, n_images = decode + t1 - t0, preprocess + t2 - t1, n_images + 1
        t0 = time.perf_counter()
        tokenize_conversation(r["conversations"], tokenizer, template, num_images=int("image" in r))
        tokenize += time.perf_counter() - t0
    return {"decode_ms_per_image": 1e3 * decode / max(1, n_images),
            "preprocess_ms_per_image": 1e3 * preprocess / max(1, n_images),
            "tokenize_ms_per_sample": 1e3 * tokenize / len(records)}


def time_loader(dataset, workers: int, batch: int, collate, passes: int) -> dict[str, float]:
    """Steady-state samples/s of a DataLoader over `passes` passes (from the first batch on)."""
    shuffle_free = {"batch_size": batch, "collate_fn": collate, "num_workers": workers,
                    "persistent_workers": workers > 0}
    loader = DataLoader(dataset, **shuffle_free)
    t_start = time.perf_counter()
    first, samples = None, 0
    for _ in range(passes):
        for b in loader:
            if first is None:
                first = time.perf_counter()
                continue
            samples += len(b["ids"])
    elapsed = time.perf_counter() - first
    rate = samples / elapsed
    return {"workers": workers, "startup_s": first - t_start, "samples_per_s": rate,
            "samples_per_s_per_worker": rate / max(1, workers)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--text-only", type=float, default=0.0, help="share of text-only samples")
    ap.add_argument("--image-size", type=int, default=336)
    ap.add_argument("--aspect", default="pad", choices=["pad", "square"])
    ap.add_argument("--tokenizer", help="tokenizer directory (default: a SentencePiece Llama tokenizer trained on "
                                        "the demo corpus, the same slow tokenizer class as Vicuna's)")
    ap.add_argument("--template", default="vicuna_v1")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--passes", type=int, default=2, help="passes over the samples per worker count")
    ap.add_argument("--source", default="json", choices=["json", "shards"])
    ap.add_argument("--dir", help="where to draw the data (default: a temporary directory)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.dir or tmp)
        data = make_data(root, args.samples, args.text_only, args.seed)
        tok_dir = args.tokenizer or str(train_llama_tokenizer(demo_corpus(400), root / "tokenizer"))
        tokenizer, template = load_tokenizer(tok_dir), get_template(args.template)
        processor = ImageProcessor(args.image_size, CLIP_MEAN, CLIP_STD, args.aspect)
        tokens_per_image = (args.image_size // 14) ** 2
        print(f"{args.samples} samples ({args.text_only:.0%} text-only), JPEG at COCO-like sizes, "
              f"{args.image_size} px '{args.aspect}', template {args.template}, tokenizer "
              f"{args.tokenizer or 'demo (slow LlamaTokenizer)'}, source {args.source}, {os.cpu_count()} CPU cores")
        costs = stage_costs(data, tokenizer, processor, template)
        print("one process: " + ", ".join(f"{k} {v:.2f}" for k, v in costs.items()))
        if args.source == "json":
            dataset = LlavaJsonDataset(data, root / "images", tokenizer, template, processor, tokens_per_image, 4096)
        else:
            from data_prep.make_shards import convert
            from llava_sft.data.shards import ShardDataset

            convert(data, root / "images", root / "shards", samples_per_shard=max(1, args.samples // 8), workers=2)
            dataset = ShardDataset(root / "shards", tokenizer, template, processor, tokens_per_image, 4096,
                                   shuffle_buffer=0)
        collate = Collator(tokenizer.pad_token_id)
        rows = []
        print(f"{'workers':>8} {'start-up s':>11} {'samples/s':>10} {'per worker':>11}")
        for workers in args.workers:
            r = time_loader(dataset, workers, args.batch, collate, args.passes)
            rows.append(r)
            print(f"{workers:>8} {r['startup_s']:>11.2f} {r['samples_per_s']:>10.1f} {r['samples_per_s_per_worker']:>11.1f}")
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "stages": costs, "loader": rows}, indent=2))


if __name__ == "__main__":
    main()
