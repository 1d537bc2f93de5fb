"""Training-step throughput and peak memory of the one training core, per stage, for a model shape.

    python benchmarks/train_step.py                       # tiny shape on CPU (what CI machines can run)
    python benchmarks/train_step.py --llm-hidden 4096 --llm-layers 32 --llm-heads 32 --llm-inter 11008 \
        --vision ViT-L-14-336 --seq-text 200 --micro 4 --device cuda      # a 7B-shaped run (random weights)

Reports, for Stage 1 (projector only) and Stage 2 (projector + LLM): seconds per optimizer step,
tokens/s (sequence tokens after image expansion), samples/s and peak memory. Random weights and
random token ids: the numbers measure compute, not learning. Record results in benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import time

import torch

from llava_sft.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava_sft.model.llava import LlavaModel, LLMConfig, ModelConfig
from llava_sft.model.vision import VisionConfig
from llava_sft.train.trainer import DDPEngine, accumulate_gradients, param_groups, peak_memory_gb


def make_batch(micro: int, seq_text: int, vocab: int, image_size: int) -> dict:
    ids = torch.randint(3, vocab, (micro, seq_text))
    ids[:, 1] = IMAGE_TOKEN_INDEX
    labels = ids.clone()
    labels[:, : seq_text // 2] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids), "ids": list(range(micro)),
            "images": torch.randn(micro, 3, image_size, image_size)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vision", default="tiny", help="'tiny' (configs/demo/tiny-vit.json) or an open_clip model name")
    ap.add_argument("--llm-hidden", type=int, default=256)
    ap.add_argument("--llm-layers", type=int, default=4)
    ap.add_argument("--llm-heads", type=int, default=4)
    ap.add_argument("--llm-inter", type=int, default=704)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq-text", type=int, default=64, help="text tokens per sample (plus one image)")
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    vision = (VisionConfig(model="tiny-vit", pretrained=None, model_config_file="configs/demo/tiny-vit.json")
              if args.vision == "tiny" else VisionConfig(model=args.vision, pretrained=None))
    llm = LLMConfig(config={"model_type": "llama", "hidden_size": args.llm_hidden, "intermediate_size": args.llm_inter,
                            "num_hidden_layers": args.llm_layers, "num_attention_heads": args.llm_heads,
                            "num_key_value_heads": args.llm_heads, "vocab_size": args.vocab,
                            "max_position_embeddings": 4096}, attn_implementation="sdpa")
    model = LlavaModel(ModelConfig(vision=vision, llm=llm)).to(device)
    if args.gradient_checkpointing:
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    size = model.vision_tower.image_size
    print(f"device={device} llm_params={sum(p.numel() for p in model.llm.parameters()) / 1e6:.1f}M "
          f"image_tokens={model.tokens_per_image} seq={args.seq_text - 1 + model.tokens_per_image} "
          f"micro={args.micro} accum={args.accum}")
    print(f"{'stage':<8} {'s/step':>8} {'tokens/s':>10} {'samples/s':>10} {'peak_mem_GB':>12}")
    for stage, train_llm in (("stage1", False), ("stage2", True)):
        model.set_trainable(True, train_llm)
        opt = torch.optim.AdamW(param_groups(model, 0.0, 1e-5), lr=1e-5)
        micro = [make_batch(args.micro, args.seq_text, args.vocab, size) for _ in range(args.accum)]
        times, tokens = [], 0
        for step in range(args.steps + 1):  # the first step is warm-up
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            row = accumulate_gradients(DDPEngine.local(model), micro, device, use_autocast=device.type == "cuda")
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step:
                times.append(time.perf_counter() - t0)
                tokens = row["tokens"]
        step_s = sum(times) / len(times)
        samples = args.micro * args.accum
        print(f"{stage:<8} {step_s:>8.3f} {tokens / step_s:>10.0f} {samples / step_s:>10.1f} {peak_memory_gb(device, 1):>12.2f}")


if __name__ == "__main__":
    main()
