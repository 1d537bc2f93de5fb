"""Fold a LoRA/QLoRA run's adapters into its base LLM and write a plain model directory.

    python -m llava_sft.merge_lora --model checkpoints/llava-v1.5-7b-lora --out checkpoints/llava-v1.5-7b-merged \
        [--base /models/vicuna-7b-v1.5]

The output is an ordinary saved model directory (full `llm/` weights, no adapter, `model.lora` unset)
that `generate`, the eval runners and `LlavaModel.from_pretrained` load without peft. A QLoRA run is
merged into its base loaded in full precision (`model.llm.dtype`), not into the 4-bit weights.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from llava_sft.model.llava import CONFIG_FILE, LlavaModel

log = logging.getLogger(__name__)


def merge_lora(model_dir: str | Path, out_dir: str | Path, base_llm: str | None = None) -> Path:
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    saved = json.loads((model_dir / CONFIG_FILE).read_text())
    if not saved["model"].get("lora"):
        raise ValueError(f"{model_dir} is not a LoRA model directory (model.lora is not set in {CONFIG_FILE})")
    if out_dir.resolve() == model_dir.resolve():
        raise ValueError("--out must differ from --model")
    model, tokenizer, saved = LlavaModel.from_pretrained(model_dir, "cpu", base_llm=base_llm, quantize=False)
    lora = model.cfg.lora
    model.llm = model.llm.merge_and_unload()
    model.cfg.lora = None
    model.cfg.llm.path = None  # the weights now live in out_dir/llm
    extra = {k: v for k, v in saved.items() if k not in ("format", "model", "dims", "image")}
    extra["merged_from"] = {"adapter_dir": str(model_dir), "lora": lora.__dict__ if lora else None}
    model.save_pretrained(out_dir, tokenizer, extra)
    log.info("merged %s into %s", model_dir, out_dir)
    return out_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="LoRA/QLoRA run directory (Stage-2 output)")
    ap.add_argument("--out", required=True, help="directory for the merged model")
    ap.add_argument("--base", default=None, help="base LLM directory, if it moved since training")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(merge_lora(args.model, args.out, args.base))


if __name__ == "__main__":
    main()
