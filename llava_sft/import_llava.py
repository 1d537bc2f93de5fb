"""Import official LLaVA checkpoints into our formats.

    # a LLaVA-1.5 release -> our model directory (generate / eval / Stage-2 training load it)
    python -m llava_sft.import_llava --model llava-v1.5-7b --out checkpoints/llava-v1.5-7b-imported \\
        [--vision-tower clip-vit-large-patch14-336] [--template vicuna_v1] [--dtype float16]
    # a LLaVA-Pretrain projector -> our Stage-1 output (train.pretrained_projector of a Stage-2 run)
    python -m llava_sft.import_llava --model llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5/mm_projector.bin \\
        --out checkpoints/llava-v1.5-7b-pretrain-imported

`--vision-tower`: a local copy of the HF CLIP tower the checkpoint names in `mm_vision_tower` (offline clusters).
Unsupported checkpoints exit with code 2 and the reason; see llava_sft/interop/official.py.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from llava_sft.interop.clip_convert import UnsupportedConversion


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="LLaVA release directory, or mm_projector.bin (or its directory)")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--vision-tower", default=None, help="local HF CLIP directory instead of the one named in config.json")
    ap.add_argument("--template", default="vicuna_v1", help="chat template of the imported model (LLaVA-1.5: vicuna_v1)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="LLM weights dtype (default: the checkpoint's torch_dtype)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from llava_sft.interop.official import import_official, import_pretrain_projector

    path = Path(args.model)
    try:
        if path.name == "mm_projector.bin" or (path / "mm_projector.bin").is_file():
            out = import_pretrain_projector(path, args.out, args.vision_tower)
        else:
            out = import_official(path, args.out, args.vision_tower, args.template, args.dtype)
    except (UnsupportedConversion, FileNotFoundError) as err:
        print(f"cannot import {args.model}: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
