"""Check a downloaded data tree against the layout the recipe configs expect (`LLAVA_DATA_ROOT`).

    python -m data_prep.check_layout [--root DIR] [--dataset NAME ... | --all] [--sample N] [--json OUT]

The layout is `DATA` below, one entry per dataset: its JSON and the image folder the recipe configs
(configs/llava_v1_5/*.yaml, configs/llava_v1/*.yaml) give as `data.path` / `data.image_folder`, the
sub-folders its records' `image` paths start with, and the record count of the official file. Per dataset:
  - the JSON exists, parses, and is a list of records ('image' a path or a list of paths);
  - its record count against the official one (a WARN only: filtered versions are legitimate);
  - the image folders the records reference against those present, and the expected ones;
  - referenced image files that do not exist (every one, or a seeded random `--sample N` of them), with up
    to 10 example paths per folder, and how many exist under another extension (OCR-VQA's .gif/.png
    files where the JSON says .jpg, haotian-liu/LLaVA#593);
  - which recipe configs read it.
Lines are OK / WARN / FAIL / INFO. Exit code 0 when every requested dataset is usable, 1 when one is
missing, unreadable or has missing images, 2 on usage errors. `--all` (the default) checks every dataset
whose JSON exists and lists the others as not downloaded (a failure only when named with --dataset, or
when none is there at all). Undecodable images and per-sample structure against the run's tokenizer and
template: `python -m llava_sft.data.validate CONFIG --decode-images`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from llava_sft.config import ENV_VAR
from llava_sft.data.dataset import image_list
from llava_sft.data.templates import BadSampleError

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = 10  # example paths per problem
OTHER_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".JPG", ".JPEG", ".PNG", ".GIF")

# The expected layout, relative to the root. `image_folder`: what the configs give as data.image_folder (the
# records' `image` paths are relative to it); `folders`: the sub-folders of image_folder the paths start
# with ("" = the images lie in image_folder itself, possibly in sub-folders of their own).
# Record counts of the official files (the number of elements of the JSON list), where they come from:
#   558128  blip_laion_cc_sbu_558k.json: num_examples of the HF dataset cards built from it
#           (lmms-lab/LLaVA-ReCap-558K; TIGER-Lab/llava-data, config llava_pretrain)
#   665298  llava_v1_5_mix665k.json: haotian-liu/LLaVA issue #657 (coco 364100, vg 86417, gqa 72140, ocr_vqa
#           80000, textvqa 21953, text-only 40688) and the HF card mrm8488/llava_v1_5_mix665k
#   157712  llava_instruct_150k.json: HF card BUAADreamer/llava-en-zh-300k (config en, "150k examples ...
#           from LLaVA") and third-party READMEs ("LLaVA-Instruct 150K (157,712 records)")
#   595375  CC3M-595K chat.json: one third-party README only ("LLaVA-CC3M-Pretrain-595K (595,375 samples)");
#           not confirmed by the dataset's own card, hence `count_confirmed: False` (the WARN says so)
# Count mismatches are warnings in every case.
DATA = {
    "llava_pretrain_558k": {
        "json": "LLaVA-Pretrain/blip_laion_cc_sbu_558k.json",
        "image_folder": "LLaVA-Pretrain/images",
        "folders": [""],
        "records": 558128, "count_confirmed": True,
        "download": "huggingface.co/datasets/liuhaotian/LLaVA-Pretrain (blip_laion_cc_sbu_558k.json, images.zip)",
    },
    "llava_v1_5_mix665k": {
        "json": "llava_v1_5_mix665k.json",
        "image_folder": "",
        "folders": ["coco/train2017", "gqa/images", "ocr_vqa/images", "textvqa/train_images", "vg/VG_100K",
                    "vg/VG_100K_2"],
        "records": 665298, "count_confirmed": True,
        "download": "huggingface.co/datasets/liuhaotian/LLaVA-Instruct-150K (llava_v1_5_mix665k.json); images: "
                    "COCO train2017, GQA, OCR-VQA, TextVQA train_val, Visual Genome parts 1 and 2",
    },
    "cc3m_595k": {
        "json": "LLaVA-CC3M-Pretrain-595K/chat.json",
        "image_folder": "LLaVA-CC3M-Pretrain-595K/images",
        "folders": [""],
        "records": 595375, "count_confirmed": False,
        "download": "huggingface.co/datasets/liuhaotian/LLaVA-CC3M-Pretrain-595K (chat.json, images.zip)",
    },
    "llava_next_mix760k": {  # configs/llava_next/: LLaVA-1.6's Stage-2 mix was never released (the blog: ~760K)
        "json": "llava_next_mix760k.json",
        "image_folder": "",
        "folders": [""],
        "records": 760000, "count_confirmed": False,
        "download": "not released: put a stand-in here (e.g. Open-LLaVA-NeXT's 1M mix, github.com/xiaoachen98/"
                    "Open-LLaVA-NeXT, whose README links its JSON and image folders) or point data.path at it",
    },
    "rlaif_v": {  # configs/llava_v1_5/stage3_dpo_7b*.yaml: preference pairs (Stage 3), README of RLAIF-V-Dataset
        "json": "rlaif_v.json",
        "image_folder": "rlaif_v_images",
        "folders": [""],
        "records": 83132, "count_confirmed": False,
        "download": "huggingface.co/datasets/openbmb/RLAIF-V-Dataset (parquet files), then python -m "
                    "data_prep.convert_preferences --format rlaif_v --input <parquet> --out rlaif_v.json "
                    "--image-dir rlaif_v_images",
    },
    "llava_instruct_150k": {
        "json": "LLaVA-Instruct-150K/llava_instruct_150k.json",
        "image_folder": "coco/train2017",
        "folders": [""],
        "records": 157712, "count_confirmed": True,
        "download": "huggingface.co/datasets/liuhaotian/LLaVA-Instruct-150K (llava_instruct_150k.json); "
                    "images: COCO train2017",
    },
}


def default_root() -> Path:
    return Path(os.environ.get("LLAVA_DATA_ROOT") or "./playground/data")


def _join(*parts: str) -> str:
    return "/".join(p for p in parts if p) or "."


def config_data_paths(config_dir: Path = REPO / "configs") -> dict[str, tuple[str, str | None]]:
    """{config file (repo-relative): (data.path, data.image_folder) relative to LLAVA_DATA_ROOT} for every
    config under config_dir whose data.path lies under ${LLAVA_DATA_ROOT}."""
    ROOT = "__LLAVA_DATA_ROOT__"  # ${LLAVA_DATA_ROOT...} stands for the root; other variables take their default
    out = {}
    for path in sorted(config_dir.rglob("*.yaml")):
        text = ENV_VAR.sub(lambda m: ROOT if m.group(1) == "LLAVA_DATA_ROOT" else (m.group(2) or ""), path.read_text())
        try:
            data = (yaml.safe_load(text) or {}).get("data") or {}
        except (yaml.YAMLError, AttributeError):
            continue

        def rel(value):
            if isinstance(value, str) and (value == ROOT or value.startswith(ROOT + "/")):
                return value[len(ROOT):].strip("/")
            return None

        if rel(data.get("path")) is not None:
            name = str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)
            out[name] = (rel(data.get("path")), rel(data.get("image_folder")))
    return out


def _map(fn, items: list, workers: int) -> list:
    """[fn(x) for x in items] on threads: a stat on a network file system waits on I/O."""
    if workers <= 1 or len(items) < 2000:
        return [fn(x) for x in items]
    size = math.ceil(len(items) / workers)
    with ThreadPoolExecutor(workers) as pool:
        parts = pool.map(lambda i: [fn(x) for x in items[i:i + size]], range(0, len(items), size))
        return [y for part in parts for y in part]


def _other_extension(path: str) -> str | None:
    stem, ext = os.path.splitext(path)
    return next((alt for alt in OTHER_EXTENSIONS if alt != ext and os.path.exists(stem + alt)), None)


def check_dataset(root: Path, name: str, sample: int | None = None, workers: int = 16,
                  configs: dict | None = None) -> dict:
    spec = DATA[name]
    configs = config_data_paths() if configs is None else configs
    result = {"dataset": name, "json": spec["json"], "image_folder": spec["image_folder"] or ".",
              "configs": [c for c, (p, _) in configs.items() if p == spec["json"]], "lines": []}

    def line(level: str, text: str, examples: list[str] = ()):
        result["lines"].append({"level": level, "text": text, **({"examples": list(examples)} if examples else {})})

    json_path = root / spec["json"]
    if not json_path.is_file():
        result["status"] = "absent"
        line("FAIL", f"{spec['json']} not found under {root} (download: {spec['download']})")
        return result
    try:
        with open(json_path, encoding="utf-8") as f:
            records = json.load(f)
        if not isinstance(records, list):
            raise ValueError(f"expected a JSON list of records, got {type(records).__name__}")
    except (OSError, ValueError) as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        result["status"] = "fail"
        line("FAIL", f"{spec['json']} is not a readable LLaVA JSON: {e}")
        return result

    # Records -> image paths; a record that is not an object with 'conversations' or has a bad 'image' field.
    uses: Counter = Counter()
    bad: list[str] = []
    text_only = 0
    for i, record in enumerate(records):
        sample_id = str(record.get("id", f"#{i}")) if isinstance(record, dict) else f"#{i}"
        try:
            if not isinstance(record, dict) or "conversations" not in record:
                raise BadSampleError(sample_id, "not a record with 'conversations'")
            images = image_list(record, sample_id)
        except BadSampleError as e:
            bad.append(f"{sample_id}: {e.reason}")
            continue
        text_only += not images
        uses.update(images)
    n = len(records)
    result["records"] = n
    result["expected_records"] = spec["records"]
    result["text_only"] = text_only
    if n == spec["records"]:
        line("OK", f"{spec['json']}: {n} records, as the official file")
    else:
        line("WARN", f"{spec['json']}: {n} records, the official file has {spec['records']}"
                     + ("" if spec["count_confirmed"] else " (count from a single third-party report)")
                     + " (fine for a filtered or extended version)")
    if bad:
        line("FAIL", f"{len(bad)} malformed records (check with python -m llava_sft.data.validate)", bad[:EXAMPLES])

    # Referenced images, grouped by folder: the longest expected folder they start with, else as many leading
    # path components as the expected folders have.
    expected = spec["folders"]
    depth = max((len(f.split("/")) for f in expected if f), default=0)
    by_folder: dict[str, list[str]] = defaultdict(list)
    longest_first = sorted(expected, key=len, reverse=True)
    for image in uses:
        folder = next((f for f in longest_first if not f or image.startswith(f + "/")), None)
        if folder is None:
            parts = image.split("/")
            folder = "/".join(parts[:min(depth, len(parts) - 1)])
        by_folder[folder].append(image)

    chosen = set(uses)
    if sample is not None and sample < len(uses):
        chosen = set(random.Random(0).sample(sorted(uses), sample))
    image_root = root / spec["image_folder"] if spec["image_folder"] else root
    folders, totals = {}, Counter()
    for folder in sorted(set(by_folder) | set(expected)):
        images = by_folder.get(folder, [])
        shown = _join(spec["image_folder"], folder)
        present = (image_root / folder).is_dir() if folder else image_root.is_dir()
        info = {"expected": folder in expected, "present": present, "images": len(images),
                "records": sum(uses[x] for x in images)}
        folders[shown] = info
        if not images:
            line("INFO", f"{shown}/: expected, not referenced by this JSON"
                         + ("" if present else " (absent, not needed)"))
            continue
        check = [x for x in images if x in chosen]
        exists = _map(os.path.exists, [str(image_root / x) for x in check], workers) if present else []
        missing = [x for x, ok in zip(check, exists, strict=True) if not ok] if present else check
        alts = _map(_other_extension, [str(image_root / x) for x in missing], workers) if present else []
        other = Counter(e for e in alts if e)
        named = sorted({os.path.splitext(x)[1] for x, e in zip(missing, alts, strict=False) if e})
        examples = [_join(spec["image_folder"], x) for x in missing[:EXAMPLES]]
        info.update(checked=len(check), missing=len(missing), other_extension=dict(other))
        totals.update(images=len(images), checked=len(check), missing=len(missing))
        extra = "" if folder in expected else " (not in the standard layout)"
        sampled = f" (random sample of {len(images)})" if len(check) < len(images) else ""
        if not present:
            line("FAIL", f"{shown}/: folder missing, {len(images)} images ({info['records']} records) "
                         f"reference it{extra}", examples)
        elif missing:
            text = f"{shown}/: {len(missing)} of {len(check)} images missing{sampled}{extra}"
            if other:
                text += (f"; {sum(other.values())} exist under another extension ("
                         + ", ".join(f"{e}: {c}" for e, c in other.most_common())
                         + f") where the JSON says {'/'.join(named)}: rename or convert them to the JSON's names "
                         "(images are read by content and converted to RGB, so renaming suffices; "
                         "haotian-liu/LLaVA#593)")
            line("FAIL", text, examples)
        else:
            line("WARN" if extra else "OK", f"{shown}/: {len(check)} images, all present{sampled}{extra}")
    result["folders"] = folders
    result["images"] = {"referenced": sum(uses.values()), "unique": len(uses), "checked": totals["checked"],
                        "missing": totals["missing"], "sampled": totals["checked"] < len(uses)}
    if result["images"]["sampled"] and totals["checked"]:
        result["images"]["estimated_missing"] = round(totals["missing"] / totals["checked"] * len(uses))
    levels = {x["level"] for x in result["lines"]}
    result["status"] = "fail" if "FAIL" in levels else "warn" if "WARN" in levels else "ok"
    return result


def format_report(report: dict) -> str:
    out = [f"data root: {report['root']}"]
    for name, r in report["datasets"].items():
        used = ", ".join(r["configs"]) or "no recipe config"
        out.append(f"\n== {name}: {r['json']} (images in {r['image_folder']}/; used by {used})")
        if r["status"] == "absent" and not r["requested"]:
            out.append("--    not downloaded")
            continue
        for x in r["lines"]:
            out.append(f"{x['level']:<5} {x['text']}")
            out += [f"        e.g. {e}" for e in x.get("examples", [])]
        if "images" in r:
            im = r["images"]
            out.append(f"      images: {im['unique']} files referenced {im['referenced']} times, "
                       f"{im['checked']} checked"
                       + (" (random sample)" if im["sampled"] else "") + f", {im['missing']} missing"
                       + (f" (~{im['estimated_missing']} in all)" if "estimated_missing" in im else ""))
        out.append("RESULT " + ("usable" if r["usable"] else "NOT usable") + f" ({r['status'].upper()})")
    failed = [n for n, r in report["datasets"].items()
              if not r["usable"] and (r["requested"] or r["status"] != "absent")]
    out.append("")
    if report["not_downloaded"]:
        out.append(f"not downloaded: {', '.join(report['not_downloaded'])}")
    if len(report["not_downloaded"]) == len(report["datasets"]) and not failed:
        out.append(f"no dataset found under {report['root']} (wrong --root or LLAVA_DATA_ROOT?)")
    out.append(f"NOT usable: {', '.join(failed)}" if failed else
               "all checked datasets are usable" if report["ok"] else "")
    return "\n".join(out)


def check_layout(root: Path, names: list[str] | None = None, sample: int | None = None, workers: int = 16) -> dict:
    """names=None: every dataset whose JSON exists (absent ones are listed, not failed)."""
    configs = config_data_paths()
    requested = set(names or ())
    datasets = {}
    for name in names or list(DATA):
        r = check_dataset(root, name, sample, workers, configs)
        r["requested"] = name in requested
        r["usable"] = r["status"] in ("ok", "warn")
        datasets[name] = r
    absent = [n for n, r in datasets.items() if r["status"] == "absent"]
    ok = all(r["usable"] for r in datasets.values() if r["requested"] or r["status"] != "absent")
    if not names and len(absent) == len(DATA):
        ok = False  # --all over an empty tree: most likely the wrong root
    return {"root": str(root), "ok": ok, "datasets": datasets, "not_downloaded": absent}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=None,
                    help="data root (default: $LLAVA_DATA_ROOT, else ./playground/data, as in the configs)")
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--dataset", nargs="+", choices=list(DATA), metavar="NAME",
                       help=f"datasets to check: {', '.join(DATA)}")
    which.add_argument("--all", action="store_true", help="every dataset whose JSON exists (the default)")
    ap.add_argument("--sample", type=int, default=None, help="check a random N of the referenced images (seed 0)")
    ap.add_argument("--workers", type=int, default=16, help="threads stat-ing image files")
    ap.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    args = ap.parse_args(argv)
    root = args.root if args.root is not None else default_root()
    if args.sample is not None and args.sample < 1:
        ap.error("--sample must be at least 1")
    if not root.is_dir():
        ap.error(f"data root {root} is not a directory (set --root or LLAVA_DATA_ROOT)")
    report = check_layout(root, args.dataset, args.sample, args.workers)
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
