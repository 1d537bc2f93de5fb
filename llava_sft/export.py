"""Export a trained model directory to other formats.

    python -m llava_sft.export hf --model checkpoints/llava-v1.5-7b --out checkpoints/llava-v1.5-7b-hf [--dtype bfloat16]

`hf` writes a Hugging Face `LlavaForConditionalGeneration` directory that `transformers` (and servers that
read that format: vLLM, SGLang, lmms-eval, VLMEvalKit) load with no custom code, with its processor
(tokenizer + chat template + image preprocessing). What HF cannot express is refused with exit code 2 and
the reason; see llava_sft/interop/hf_llava.py.
"""
from __future__ import annotations

import argparse
import logging
import sys

from llava_sft.interop.clip_convert import UnsupportedConversion


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="format", required=True)
    hf = sub.add_parser("hf", help="Hugging Face LlavaForConditionalGeneration directory")
    hf.add_argument("--model", required=True, help="our model directory (Stage-2 output, or merged LoRA)")
    hf.add_argument("--out", required=True, help="output directory (replaced if it exists)")
    hf.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="the one dtype of every exported weight (default: the saved LLM's dtype; the vision tower "
                         "and projector, trained in fp32, are cast to it)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from llava_sft.interop.hf_llava import export_hf

    try:
        out = export_hf(args.model, args.out, args.dtype)
    except UnsupportedConversion as err:
        print(f"cannot export {args.model} to HF LLaVA: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
