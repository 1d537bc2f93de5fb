"""See exactly what a model will be trained on: token ids, labels, and which text carries loss.

    python -m llava_sft.inspect --data FILE.json --tokenizer DIR --template vicuna_v1 [--max-length N] --out OUT.jsonl

Writes one JSON line per sample, `{"id", "input_ids", "labels"}`, with each image as a single
-200 placeholder (not expanded), or `{"id", "error"}` for a sample that cannot be trained on; and
prints the first samples with the supervised text marked [[like this]]. Exit code 1 if any
sample is bad. `--max-length` applies the training over-long policy, counting each image as
`--tokens-per-image` tokens (576 = CLIP ViT-L/14 at 336 px). With `--image-aspect anyres|anyres_max_N
--image-folder DIR` each image counts its own tokens, from its size (read from the file's header; data/anyres.py,
tiles of `--tile` px with `--side`^2 tokens each): rows carry `image_tokens` (one count per image) and the printed
samples name each image's grid.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from itertools import groupby
from pathlib import Path

from llava_sft.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX
from llava_sft.data.anyres import image_token_counts, layout_for, parse_aspect
from llava_sft.data.catalog import image_sizes
from llava_sft.data.dataset import fit_length, image_list
from llava_sft.data.templates import BadSampleError, get_template
from llava_sft.data.tokenize import tokenize_conversation
from llava_sft.model.llava import load_tokenizer


def render_supervision(ids: list[int], labels: list[int], tokenizer) -> str:
    """Text of a sample with supervised runs wrapped in [[...]] and images shown as <image>."""
    out = []
    for supervised, run in groupby(zip(ids, labels, strict=True), key=lambda p: p[1] != IGNORE_INDEX):
        tokens = [t for t, _ in run]
        text, chunk = "", []
        for token in tokens + [None]:
            if token is None or token == IMAGE_TOKEN_INDEX:
                text += tokenizer.decode(chunk) if chunk else ""
                text += IMAGE_PLACEHOLDER if token == IMAGE_TOKEN_INDEX else ""
                chunk = []
            else:
                chunk.append(token)
        out.append(f"[[{text}]]" if supervised else text)
    return "".join(out)


def inspect_file(data: str, tokenizer, template_name: str, out: str, max_length: int | None = None,
                 tokens_per_image: int = 576, overlong: str = "truncate", show: int = 3, layout=None,
                 image_folder: str | None = None) -> Counter:
    """`layout`: an AnyRes layout (data/anyres.py), with the `image_folder` its sizes are read from."""
    template = get_template(template_name, tokenizer=tokenizer)
    records = json.loads(Path(data).read_text())
    problems: Counter = Counter()
    with open(out, "w") as f:
        for i, record in enumerate(records):
            sample_id = record.get("id", f"#{i}") if isinstance(record, dict) else f"#{i}"
            try:
                if not isinstance(record, dict):
                    raise BadSampleError(sample_id, "not a record with 'conversations'")
                names = image_list(record, sample_id)
                ids, labels = tokenize_conversation(record.get("conversations"), tokenizer, template,
                                                    num_images=len(names), sample_id=sample_id)
                sizes = image_sizes(names, Path(image_folder), sample_id) if layout else [None] * len(names)
                counts = image_token_counts(sizes, tokens_per_image, layout)
                if max_length:
                    ids, labels, _ = fit_length(ids, labels, max_length, counts, overlong, sample_id)
            except BadSampleError as e:
                problems[e.reason.split(":")[0]] += 1
                f.write(json.dumps({"id": sample_id, "error": e.reason}) + "\n")
                print(f"BAD {e}", file=sys.stderr)
                continue
            row = {"id": sample_id, "input_ids": ids, "labels": labels}
            f.write(json.dumps({**row, "image_tokens": counts} if layout else row) + "\n")
            if i < show:
                n_sup = sum(label != IGNORE_INDEX for label in labels)
                print(f"--- {sample_id}: {len(ids)} tokens ({ids.count(IMAGE_TOKEN_INDEX)} image), {n_sup} supervised")
                for name, size, count in zip(names, sizes, counts, strict=True) if layout else ():
                    grid = ("one pad view (several images in the sample)" if size is None else
                            "grid %dx%d tiles + base" % layout.grid(size) + f" of {size[0]}x{size[1]} px")
                    print(f"    {name}: {grid} -> {count} image tokens")
                print(render_supervision(ids, labels, tokenizer))
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="LLaVA-format JSON")
    ap.add_argument("--tokenizer", required=True, help="tokenizer directory")
    ap.add_argument("--template", required=True)
    ap.add_argument("--out", required=True, help="output JSONL")
    ap.add_argument("--max-length", type=int, default=None)
    ap.add_argument("--tokens-per-image", type=int, default=576)
    ap.add_argument("--overlong", choices=["truncate", "drop"], default="truncate")
    ap.add_argument("--image-aspect", default="pad", help="pad | square (every image --tokens-per-image tokens) | "
                    "anyres | anyres_max_N (each image's own count, from its size)")
    ap.add_argument("--image-folder", default=None, help="where the images are (AnyRes reads their sizes)")
    ap.add_argument("--tile", type=int, default=336, help="AnyRes: the tower's input size")
    ap.add_argument("--side", type=int, default=24, help="AnyRes: feature tokens per tile side (336/14 = 24)")
    ap.add_argument("--pinpoints", default=None, help="AnyRes: JSON list of [width, height] (default: LLaVA-1.6's)")
    ap.add_argument("--unpad-rounding", choices=["reference", "hf"], default="reference")
    ap.add_argument("--use-fast", action="store_true", help="use the fast tokenizer (LLaVA uses the slow one)")
    ap.add_argument("--show", type=int, default=3, help="samples to print")
    args = ap.parse_args()
    try:
        if args.template != "auto":  # auto needs the tokenizer: checked when it renders
            get_template(args.template)
    except KeyError as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 2
    try:
        if args.image_aspect not in ("pad", "square"):
            parse_aspect(args.image_aspect)  # names what is allowed
        layout = layout_for(args.image_aspect, args.tile, args.side,
                            json.loads(args.pinpoints) if args.pinpoints else None, args.unpad_rounding)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if layout and not args.image_folder:
        print(f"error: --image-aspect {args.image_aspect} needs --image-folder (each image's tokens follow from its "
              f"size)", file=sys.stderr)
        return 2
    tokenizer = load_tokenizer(args.tokenizer, use_fast=args.use_fast)
    problems = inspect_file(args.data, tokenizer, args.template, args.out, args.max_length, args.tokens_per_image,
                            args.overlong, args.show, layout, args.image_folder)
    if problems:
        print(f"{sum(problems.values())} bad sample(s): {dict(problems)}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
