"""Scan a training dataset before the run: every problem that would stop or silently shrink it, by kind.

    python -m llava_sft.data.validate configs/llava_v1_5/stage2_finetune_7b.yaml [key=value ...] \
        [--decode-images] [--workers 8] [--report report.json]

Uses the run's own config (data path, image folder, template, tokenizer, max_length, vision tower), so
it checks exactly what training will read, with the same functions. Needs no model weights: the
number of tokens per image comes from the open_clip architecture config. Reports, each with sample ids:
  structure   roles not alternating, odd turns, no assistant turn, empty replies, bad 'image' field,
              `<image>` count != number of images, template not fitting the tokenizer
  missing     image files that do not exist
  corrupt     image files PIL cannot decode (only with --decode-images: it opens every image)
  overlong    samples longer than max_length after image expansion (truncated or dropped at run time)
  duplicate   ids used by more than one sample
plus the length distribution (text tokens, image tokens, total) and the image/text-only split.
Exit code 1 when the run would fail at start-up or at run time with `data.bad_samples=error`
(structure, missing, corrupt; and overlong under `data.overlong=drop` or when the images alone do not fit).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from llava_sft.config import RunConfig, load_config
from llava_sft.constants import IMAGE_TOKEN_INDEX
from llava_sft.data.anyres import image_token_counts, layout_for
from llava_sft.data.catalog import image_sizes
from llava_sft.data.dataset import fit_length, image_list, read_records
from llava_sft.data.templates import BadSampleError, get_template
from llava_sft.data.tokenize import tokenize_conversation

FATAL = ("structure", "missing", "corrupt")
SHOW = 20  # sample ids listed per problem kind
# what a kind's `count` counts (default: samples); its `samples` is always the number of samples it touches
UNIT = {"missing": "image files", "corrupt": "image files", "duplicate": "ids"}


def _examples(kind: str, found: list[tuple[int, str, str]]) -> list[dict]:
    if kind == "duplicate":  # one line per shared id, not one per sample holding it
        found = list({sample_id: (i, sample_id, d) for i, sample_id, d in found}.values())
    return [{"id": sample_id, "detail": detail} for _, sample_id, detail in found[:SHOW]]


def tokens_per_image(cfg: RunConfig) -> int:
    """From the open_clip architecture (no weights needed)."""
    return tower_geometry(cfg)[1]


def tower_geometry(cfg: RunConfig) -> tuple[int, int]:
    """(input size in pixels, feature tokens per image) from the open_clip architecture (no weights needed)."""
    import open_clip

    vision = cfg.model.vision
    if vision.model_config_file:
        open_clip.add_model_config(Path(vision.model_config_file))
    arch = open_clip.get_model_config(vision.model)
    if arch is None:
        raise ValueError(f"unknown open_clip model {vision.model!r} (set model.vision.model_config_file?)")
    size, patch = arch["vision_cfg"]["image_size"], arch["vision_cfg"]["patch_size"]
    size = size[0] if isinstance(size, (list, tuple)) else size
    n = (size // patch) ** 2
    return size, n + 1 if vision.select_feature == "cls_patch" else n


def _decodes(path: str) -> str | None:
    try:
        with Image.open(path) as image:
            image.load()
        return None
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds for corrupt files
        return f"{type(e).__name__}: {e}"


def validate(cfg: RunConfig, decode_images: bool = False, workers: int = 4, progress: bool = True) -> dict:
    from llava_sft.model.llava import load_tokenizer

    data = cfg.data
    if not data.path:
        raise ValueError("validate checks the LLaVA JSON of data.path (for shards: validate the JSON they were made "
                         "from, with data.path=FILE.json)")
    folder = Path(data.image_folder)
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.llm.path, use_fast=cfg.model.tokenizer_use_fast)
    template = get_template(data.template, cfg.model.system_prompt, data.loss_on, tokenizer)
    tile, per_image = tower_geometry(cfg)
    layout = layout_for(cfg.model.image_aspect, tile, int(round(per_image ** 0.5)), cfg.model.image_grid_pinpoints,
                        cfg.model.unpad_rounding)  # AnyRes: each image's tokens from its size (header)
    records = read_records(data.path)

    # problems[kind] = [(record index, sample id, detail)]; the index (ids may repeat) counts affected samples
    problems: dict[str, list[tuple[int, str, str]]] = defaultdict(list)
    ids_seen: Counter = Counter()
    index_of_id: dict[str, list[int]] = defaultdict(list)
    text_lens, image_lens, totals = [], [], []
    n_image_samples = 0
    to_decode: list[tuple[str, str]] = []
    for i, record in enumerate(tqdm(records, desc="records", disable=not progress)):
        sample_id = str(record.get("id", f"#{i}")) if isinstance(record, dict) else f"#{i}"
        ids_seen[sample_id] += 1
        index_of_id[sample_id].append(i)
        try:
            if not isinstance(record, dict) or "conversations" not in record:
                raise BadSampleError(sample_id, "not a record with 'conversations'")
            images = image_list(record, sample_id)
            ids, labels = tokenize_conversation(record["conversations"], tokenizer, template,
                                                num_images=len(images), sample_id=sample_id)
        except BadSampleError as e:
            problems["structure"].append((i, sample_id, e.reason))
            continue
        n_image_samples += bool(images)
        for name in images:
            path = folder / name
            if not path.is_file():
                problems["missing"].append((i, sample_id, str(path)))
            elif decode_images:
                to_decode.append((i, sample_id, str(path)))
        n_img = ids.count(IMAGE_TOKEN_INDEX)
        counts = [per_image] * n_img
        if layout is not None and all((folder / name).is_file() for name in images):
            try:
                counts = image_token_counts(image_sizes(images, folder, sample_id), per_image, layout)
            except BadSampleError as e:
                problems["corrupt"].append((i, sample_id, e.reason))
        text_lens.append(len(ids) - n_img)
        image_lens.append(sum(counts))
        totals.append(text_lens[-1] + image_lens[-1])
        if totals[-1] > data.max_length:
            try:
                fit_length(ids, labels, data.max_length, counts, data.overlong, sample_id)
                problems["overlong"].append((i, sample_id, f"{totals[-1]} tokens: truncated to {data.max_length}"))
            except BadSampleError as e:
                problems["overlong_dropped"].append((i, sample_id, e.reason))

    if to_decode:
        with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
            results = pool.map(_decodes, [p for _, _, p in to_decode], chunksize=64)
            for (i, sample_id, path), error in zip(to_decode, tqdm(results, total=len(to_decode), desc="decoding images",
                                                                 disable=not progress), strict=True):
                if error:
                    problems["corrupt"].append((i, sample_id, f"{path} ({error})"))
    for sample_id, count in ids_seen.items():
        if count > 1:
            problems["duplicate"] += [(i, sample_id, f"used by {count} samples") for i in index_of_id[sample_id]]

    def dist(values: list[int]) -> dict:
        if not values:
            return {}
        a = np.asarray(values)
        return {"mean": round(float(a.mean()), 1), "p50": int(np.percentile(a, 50)), "p90": int(np.percentile(a, 90)),
                "p99": int(np.percentile(a, 99)), "max": int(a.max())}

    fatal = sum(len(problems[k]) for k in FATAL) + (len(problems["overlong_dropped"]) if data.bad_samples == "error" else 0)
    affected = {i for found in problems.values() for i, _, _ in found}
    return {
        "data": data.path, "image_folder": str(folder), "template": data.template, "max_length": data.max_length,
        "tokens_per_image": per_image, "samples": len(records),
        # image + text_only + malformed == samples (malformed: a structure problem, so neither split applies)
        "modality": {"image": n_image_samples, "text_only": len(totals) - n_image_samples,
                     "malformed": len(records) - len(totals)},
        "samples_with_problems": len(affected), "clean_samples": len(records) - len(affected),
        "lengths": {"text_tokens": dist(text_lens), "image_tokens": dist(image_lens), "total": dist(totals)},
        # A sample can have problems of several kinds, so the kinds' `samples` may sum to more than
        # samples_with_problems.
        "problems": {k: {"count": len({d[1] for d in v}) if k == "duplicate" else len(v),
                         "samples": len({i for i, _, _ in v}), "unit": UNIT.get(k, "samples"),
                         "examples": _examples(k, v)}
                     for k, v in sorted(problems.items()) if v},
        "images_decoded": decode_images,
        "run_would_fail": fatal > 0,
    }


def format_report(report: dict) -> str:
    split = report["modality"]
    lines = [f"{report['data']}: {report['samples']} samples = {split['image']} with images + "
             f"{split['text_only']} text-only + {split['malformed']} malformed; "
             f"{report['tokens_per_image']} tokens per image",
             f"samples with a problem: {report['samples_with_problems']}, clean: {report['clean_samples']}"]
    total = report["lengths"]["total"]
    if total:
        lines.append(f"length after image expansion: mean {total['mean']}, p50 {total['p50']}, p90 {total['p90']}, "
                     f"p99 {total['p99']}, max {total['max']} (max_length {report['max_length']})")
    if not report["problems"]:
        lines.append("no problems found" + ("" if report["images_decoded"] else " (images not decoded: --decode-images)"))
    for kind, info in report["problems"].items():
        if info["unit"] == "samples":
            lines.append(f"{kind}: {info['samples']} samples")
        else:
            lines.append(f"{kind}: {info['count']} {info['unit']} in {info['samples']} samples")
        lines += [f"  - {e['id']}: {e['detail']}" for e in info["examples"]]
        if info["count"] > len(info["examples"]):
            lines.append(f"  ... and {info['count'] - len(info['examples'])} more")
    lines.append("RESULT: the run would FAIL with these settings" if report["run_would_fail"] else "RESULT: ok")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    ap.add_argument("--decode-images", action="store_true", help="open every image (slower, catches corrupt files)")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--report", type=Path, help="also write the report as JSON here")
    args = ap.parse_args(argv)
    report = validate(load_config(args.config, args.overrides), args.decode_images, args.workers)
    print(format_report(report))
    if args.report:
        args.report.write_text(json.dumps(report, indent=2))
    return 1 if report["run_would_fail"] else 0


if __name__ == "__main__":
    sys.exit(main())
