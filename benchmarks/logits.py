"""Peak memory and speed of a training step with the LM head at supervised positions only vs at every position.

    python benchmarks/logits.py                      # Stage 1 and Stage 2 geometries, both ways, on this machine
    python benchmarks/logits.py --json logits.json

The LLaVA-1.5 token geometry at tiny width (issue 16): a vision tower at 336 px / patch 14 (576 image tokens per
image, width 64, 2 blocks), a 2-layer LLM of width 128 with the Vicuna vocabulary (32,000), micro-batch 16.
Stage 1: one image + a 30-token caption, all of it supervised (`plain`: ~5 % of the positions), projector trained.
Stage 2: one image + 350 text tokens of which 150 are the replies (~16 % of the positions), projector + LLM
trained. Each (stage, mode) runs in a fresh process, since the peak RSS (`ru_maxrss`) only grows: `peak_gib` is
that process's peak, `base_gib` its RSS before the first step (model, optimizer-free), so `peak - base` is what the
step adds. Timed over 3 steps after one warm-up step (forward + backward, no optimizer).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llava_sft.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX  # noqa: E402

TOWER = {"embed_dim": 64, "quick_gelu": True,
         "vision_cfg": {"image_size": 336, "layers": 2, "width": 64, "head_width": 32, "patch_size": 14},
         "text_cfg": {"context_length": 8, "vocab_size": 32, "width": 16, "heads": 1, "layers": 1}}
GEOMETRY = {"stage1": {"text": 30, "supervised": 30, "train_llm": False},
            "stage2": {"text": 350, "supervised": 150, "train_llm": True}}


def one(stage: str, supervised_only: bool, micro: int, vocab: int) -> dict:
    from llava_sft.model.llava import LlavaModel, LLMConfig, ModelConfig
    from llava_sft.model.vision import VisionConfig

    tower = Path(tempfile.mkdtemp()) / "tower-336.json"
    tower.write_text(json.dumps(TOWER))
    llm = LLMConfig(config={"model_type": "llama", "hidden_size": 128, "intermediate_size": 344,
                            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
                            "vocab_size": vocab, "max_position_embeddings": 2048})
    torch.manual_seed(0)
    model = LlavaModel(ModelConfig(vision=VisionConfig(model="tower-336", pretrained=None,
                                                       model_config_file=str(tower)), llm=llm))
    geometry = GEOMETRY[stage]
    model.set_trainable(True, geometry["train_llm"])
    model.train()
    model.supervised_logits_only = supervised_only
    text = geometry["text"]
    ids = torch.randint(3, vocab, (micro, text + 1))
    ids[:, 0], ids[:, 1] = 1, IMAGE_TOKEN_INDEX
    labels = ids.clone()
    labels[:, : text + 1 - geometry["supervised"]] = IGNORE_INDEX
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids),
             "images": torch.randn(micro, 3, 336, 336)}
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    times = []
    for step in range(4):
        t0 = time.perf_counter()
        loss, count = model(**batch)
        (loss / count).backward()
        model.zero_grad(set_to_none=True)
        if step:
            times.append(time.perf_counter() - t0)
    positions = micro * (text + model.tokens_per_image)
    step_s = sum(times) / len(times)
    return {"stage": stage, "logits": "supervised" if supervised_only else "all", "micro": micro,
            "positions": positions, "supervised": int(count), "loss": round(float(loss / count), 5),
            "base_gib": round(base, 2), "peak_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "s_per_step": round(step_s, 3), "tokens_per_s": round(positions / step_s)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--micro", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--one", nargs=2, metavar=("STAGE", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], args.one[1] == "supervised", args.micro, args.vocab)))
        return
    rows = []
    print(f"{'stage':<7} {'logits':<11} {'positions':>9} {'supervised':>10} {'base GiB':>8} {'peak GiB':>8} "
          f"{'s/step':>7} {'tokens/s':>9} {'loss':>8}")
    for stage in GEOMETRY:
        for mode in ("all", "supervised"):
            out = subprocess.run([sys.executable, __file__, "--one", stage, mode, "--micro", str(args.micro),
                                  "--vocab", str(args.vocab)], capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{stage:<7} {mode:<11} {row['positions']:>9} {row['supervised']:>10} {row['base_gib']:>8.2f} "
                  f"{row['peak_gib']:>8.2f} {row['s_per_step']:>7.2f} {row['tokens_per_s']:>9} {row['loss']:>8.4f}",
                  flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
