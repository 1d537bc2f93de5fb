"""See exactly what a model will be trained on: token ids, labels, and which text carries loss.

    python -m llava_sft.inspect --data FILE.json --tokenizer DIR --template vicuna_v1 [--max-length N] --out OUT.jsonl

Writes one JSON line per sample, `{"id", "input_ids", "labels"}`, with each image as a single
-200 placeholder (not expanded), or `{"id", "error"}` for a sample that cannot be trained on; and
prints the first samples with the supervised text marked [[like this]]. Exit code 1 if any
sample is bad. `--max-length` applies the training over-long policy, counting each image as
`--tokens-per-image` tokens (576 = CLIP ViT-L/14 at 336 px).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from itertools import groupby
from pathlib import Path

from llava_sft.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX
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
                 tokens_per_image: int = 576, overlong: str = "truncate", show: int = 3) -> Counter:
    template = get_template(template_name, tokenizer=tokenizer)
    records = json.loads(Path(data).read_text())
    problems: Counter = Counter()
    with open(out, "w") as f:
        for i, record in enumerate(records):
            sample_id = record.get("id", f"#{i}") if isinstance(record, dict) else f"#{i}"
            try:
                if not isinstance(record, dict):
                    raise BadSampleError(sample_id, "not a record with 'conversations'")
                ids, labels = tokenize_conversation(record.get("conversations"), tokenizer, template,
                                                    num_images=len(image_list(record, sample_id)), sample_id=sample_id)
                if max_length:
                    ids, labels, _ = fit_length(ids, labels, max_length, tokens_per_image, overlong, sample_id)
            except BadSampleError as e:
                problems[e.reason.split(":")[0]] += 1
                f.write(json.dumps({"id": sample_id, "error": e.reason}) + "\n")
                print(f"BAD {e}", file=sys.stderr)
                continue
            f.write(json.dumps({"id": sample_id, "input_ids": ids, "labels": labels}) + "\n")
            if i < show:
                n_sup = sum(label != IGNORE_INDEX for label in labels)
                print(f"--- {sample_id}: {len(ids)} tokens ({ids.count(IMAGE_TOKEN_INDEX)} image), {n_sup} supervised")
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
    ap.add_argument("--use-fast", action="store_true", help="use the fast tokenizer (LLaVA uses the slow one)")
    ap.add_argument("--show", type=int, default=3, help="samples to print")
    args = ap.parse_args()
    try:
        if args.template != "auto":  # auto needs the tokenizer: checked when it renders
            get_template(args.template)
    except KeyError as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 2
    tokenizer = load_tokenizer(args.tokenizer, use_fast=args.use_fast)
    problems = inspect_file(args.data, tokenizer, args.template, args.out, args.max_length, args.tokens_per_image,
                            args.overlong, args.show)
    if problems:
        print(f"{sum(problems.values())} bad sample(s): {dict(problems)}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
