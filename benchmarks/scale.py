"""Peak memory and step time of Stage 2 per scale-out configuration: full / LoRA / QLoRA x DDP / ZeRO-2 / ZeRO-3 /
FSDP2.

    python benchmarks/scale.py                         # small shape, 2 CPU processes (gloo): what a CPU machine runs
    python benchmarks/scale.py --shape 7b --nproc 8 --device cuda --micro 4 --seq 2048   # 7B-shaped, random weights
    python benchmarks/scale.py --predict-only --shape 7b --nproc 8                        # the model-state arithmetic

Every configuration is a real run of the training core (`torchrun -m llava_sft.train`, the shipped
configs/deepspeed JSONs) on a generated dataset (random-noise images, random-word conversations, a
SentencePiece tokenizer trained on them) and a random-weight LLM of the given shape saved to disk (LoRA
and QLoRA load a base from a directory). Per configuration it reports the median s/step and tokens/s over
the steps after the first, and `peak_mem_gb` from metrics.jsonl (max over ranks: CUDA max_memory_allocated,
or the process's peak RSS on a CPU, which includes the Python/torch/DeepSpeed runtime: the `runtime` line
is that baseline, measured by importing the same modules in an idle process; on a CPU peak RSS is dominated
by that runtime and by load-time transients, so the CPU rows also give `live_gb`: the bytes of all live
tensors just before the optimizer step, when weights, gradients and optimizer states are all held, max
over ranks (`train.profile_memory`): the analogue of CUDA's allocated memory, without the activations).

Beside each measurement, `states_gb` is the per-rank memory of the model states predicted by the ZeRO
paper's arithmetic (Rajbhandari et al. 2020, section 3): frozen weights at their dtype (NF4: 0.5 byte +
double-quantised scales), and per trainable parameter weights + gradients + AdamW moments (fp32: 4 + 4 + 8
bytes, + 4 for DeepSpeed's fp32 partition copy; bf16 mixed precision: 2 + 2 + 4 master + 8), partitioned over N ranks as each stage does: ZeRO-2 the optimizer states and gradients,
ZeRO-3 also the weights; the frozen vision tower is whole on every rank. Not counted: DeepSpeed's
communication buckets (reduce_bucket_size, prefetch) and ZeRO-3's persistent small parameters. Activations are not included: they depend on
micro-batch, sequence length and gradient checkpointing. QLoRA runs under ZeRO-2 or DDP only (ZeRO-3 and FSDP2
cannot partition a 4-bit base; the trainer refuses it). FSDP2 (train.engine=fsdp2) upcasts every LLM and projector
weight to fp32 and shards it with its gradient and AdamW moments: 4 bytes per frozen and 16 per trainable
parameter, over N ranks.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = {  # LLM (Llama architecture) and vision tower of each named shape
    "small": {"llm": {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 6, "num_attention_heads": 12,
                      "vocab_size": 32000},
              "vision": {"model": "tiny-vit", "model_config_file": "configs/demo/tiny-vit.json"}, "lora_r": 24},
    "7b": {"llm": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
                   "vocab_size": 32000},  # Vicuna-7B / Llama-2-7B
           "vision": {"model": "ViT-L-14-336"}, "lora_r": 128},
}
ENGINES = {"ddp": None, "zero2": "configs/deepspeed/zero2.json", "zero3": "configs/deepspeed/zero3.json",
           "fsdp2": None}  # engine -> its DeepSpeed JSON
METHODS = ("full", "lora", "qlora")


# ----------------------------------------------------------------------------------- model-state arithmetic
# (llava_sft/train/memory.py: shared with python -m llava_sft.preflight)
from llava_sft.train.memory import (  # noqa: E402
    linear_weights,  # noqa: F401
    llm_params,
    lora_params,
    predicted_activations_gb,
    predicted_states_gb,
)


def vision_param_count(vision: dict) -> int:
    from llava_sft.model.vision import VisionConfig, build_vision_tower

    tower = build_vision_tower(VisionConfig(pretrained=None, **vision))
    return sum(p.numel() for p in tower.parameters())


# ----------------------------------------------------------------------------------- data and base model
WORDS = ("red green blue small large circle square triangle left right top bottom near far above below image "
         "picture shows there is a the of and with on in at color shape object scene describe what where how many "
         "count two three four one zero yes no person dog cat car tree house sky water road table chair").split()


def make_data(out: Path, samples: int, answer_words: int, image_size: int, seed: int = 0) -> None:
    from PIL import Image

    from llava_sft.data.tokenizer_train import train_llama_tokenizer

    rng = random.Random(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    for i in range(8):
        pixels = bytes(rng.randrange(256) for _ in range(image_size * image_size * 3))
        Image.frombytes("RGB", (image_size, image_size), pixels).save(out / "images" / f"{i}.png")
    records, texts = [], []
    for i in range(samples):
        question = " ".join(rng.choice(WORDS) for _ in range(12)) + "?"
        answer = " ".join(rng.choice(WORDS) for _ in range(answer_words)) + "."
        records.append({"id": str(i), "image": f"{i % 8}.png", "conversations": [
            {"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": answer}]})
        texts += [question, answer]
    (out / "data.json").write_text(json.dumps(records))
    train_llama_tokenizer(texts[:2000], out / "tokenizer", vocab_size=300)


def make_base_llm(out: Path, llm: dict, dtype: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**llm, num_key_value_heads=llm["num_attention_heads"], max_position_embeddings=4096,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    model.save_pretrained(out)


def run_config(args, work: Path, method: str, engine: str) -> dict:
    shape = SHAPES[args.shape]
    lora = None if method == "full" else {"r": shape["lora_r"], "alpha": 2 * shape["lora_r"], "dropout": 0.05,
                                          "quantize": "nf4" if method == "qlora" else None}
    return {
        "run_name": f"scale-{method}-{engine}",
        "model": {"vision": {"name": "openclip", "pretrained": None, "quick_gelu": True, "select_layer": -2,
                             "select_feature": "patch", **shape["vision"]},
                  "projector": "mlp2x_gelu",
                  "llm": {"path": str(work / "llm"), "attn_implementation": args.attn, "dtype": args.dtype},
                  "tokenizer": str(args.data / "tokenizer"), "image_aspect": "pad", "template": "vicuna_v1",
                  "lora": lora},
        "data": {"path": str(args.data / "data.json"), "image_folder": str(args.data / "images"),
                 "template": "vicuna_v1", "max_length": 4096, "num_workers": 1},
        "train": {"train_projector": True, "train_llm": True, "output_dir": str(work / "runs" / f"{method}-{engine}"),
                  "deepspeed": ENGINES[engine], "engine": "fsdp2" if engine == "fsdp2" else "auto",
                  "global_batch_size": args.micro * args.nproc * args.accum,
                  "micro_batch_size": args.micro, "max_steps": args.steps + 1, "lr": 2e-4 if lora else 2e-5,
                  "projector_lr": 2e-5, "warmup_ratio": 0.0, "bf16": args.device == "cuda",
                  "gradient_checkpointing": args.gradient_checkpointing, "save_every": 0, "log_every": 1, "profile_memory": args.device == "cpu",
                  "seed": 0, "device": args.device},
    }


def runtime_rss_gb() -> float:
    code = ("import resource, torch, transformers, deepspeed, open_clip, peft, llava_sft.train.trainer; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)")
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"), PYTHONWARNINGS="ignore")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def measure(args, work: Path, method: str, engine: str, port: int) -> dict:
    import yaml

    cfg = run_config(args, work, method, engine)
    cfg_file = work / f"{method}-{engine}.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    run_dir = Path(cfg["train"]["output_dir"])
    shutil.rmtree(run_dir, ignore_errors=True)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore", PYTHONPATH=str(REPO))
    if args.device == "cpu":
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(args.threads), CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc), "--master_port",
           str(port), "-m", "llava_sft.train", str(cfg_file)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if result.returncode != 0:
        tail = [line for line in result.stderr.splitlines() if line.strip()][-3:]
        return {"error": " | ".join(tail)[-300:]}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()][1:]
    step_s = statistics.median(r["data_s"] + r["compute_s"] for r in rows)
    return {"s_per_step": round(step_s, 3), "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in rows), 1),
            "peak_mem_gb": max(r["peak_mem_gb"] for r in rows), "loss": rows[-1]["loss"],
            **({"live_tensor_gb": max(r["live_tensor_gb"] for r in rows)} if "live_tensor_gb" in rows[0] else {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--nproc", type=int, default=2, help="processes (GPUs) on this machine")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--micro", type=int, default=2, help="samples per micro-batch and rank")
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--seq", type=int, default=64, help="approximate text tokens per sample (plus the image tokens)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process on a CPU")
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--work", default="/tmp/llava_sft_scale", help="scratch directory (data, base LLM, runs)")
    ap.add_argument("--predict-only", action="store_true", help="print the model-state arithmetic, run nothing")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    shape = SHAPES[args.shape]
    methods, engines = args.methods.split(","), args.engines.split(",")
    vision_params = vision_param_count(shape["vision"])
    vision_width = 1024 if shape["vision"]["model"].startswith("ViT-L") else 128
    h = shape["llm"]["hidden_size"]
    projector_params = vision_width * h + h + h * h + h
    print(f"shape={args.shape}: LLM {llm_params(shape['llm']) / 1e6:.1f}M params, vision {vision_params / 1e6:.1f}M "
          f"(frozen), projector {projector_params / 1e6:.2f}M, LoRA r={shape['lora_r']}: "
          f"{lora_params(shape['llm'], shape['lora_r']) / 1e6:.2f}M adapter params; {args.nproc} x {args.device}, "
          f"{'bf16' if args.device == 'cuda' else 'fp32'}, micro {args.micro} x accum {args.accum}")
    results = []
    work = Path(args.work) / args.shape
    if not args.predict_only:
        samples = args.micro * args.nproc * args.accum * (args.steps + 1)
        data = work / f"data-{samples}x{args.seq}"
        if not (data / "data.json").is_file():
            image_size = 336 if shape["vision"]["model"].endswith("336") else 48
            make_data(data, samples, args.seq * 2 // 3, image_size)
        args.data = data
        if not (work / "llm" / "config.json").is_file():
            make_base_llm(work / "llm", shape["llm"], args.dtype)
        if args.device == "cpu":
            print(f"runtime (idle process with torch/transformers/deepspeed imported): peak RSS {runtime_rss_gb():.2f} GB")
    if args.predict_only:
        act = predicted_activations_gb(shape["llm"], args.micro, args.seq, args.gradient_checkpointing,
                                       args.device == "cuda")
        print(f"activations (estimate, micro {args.micro} x {args.seq} tokens, gradient checkpointing "
              f"{'on' if args.gradient_checkpointing else 'off'}): {act:.1f} GB per rank")
    print(f"{'method':<6} {'engine':<6} {'states_gb':>9} {'live_gb':>8} {'peak_mem_gb':>11} {'s/step':>7} {'tokens/s':>9}")
    port = 29900
    for method in methods:
        for engine in engines:
            states = 0.0 if method == "qlora" and engine == "fsdp2" else predicted_states_gb(
                method, engine, args.nproc, shape["llm"], vision_params, projector_params, shape["lora_r"],
                args.device == "cuda")
            row = {"method": method, "engine": engine, "states_gb": round(states, 3)}
            if method == "qlora" and engine in ("zero3", "fsdp2"):
                row["error"] = f"refused: {engine} cannot shard a 4-bit base"
            elif not args.predict_only:
                port += 1
                row.update(measure(args, work, method, engine, port))
            results.append(row)
            if "error" in row:
                print(f"{method:<6} {engine:<6} {states:>9.2f}  {row['error']}")
            elif args.predict_only:
                print(f"{method:<6} {engine:<6} {states:>9.2f}")
            else:
                live = f"{row['live_tensor_gb']:>8.2f}" if "live_tensor_gb" in row else f"{'-':>8}"
                print(f"{method:<6} {engine:<6} {states:>9.2f} {live} {row['peak_mem_gb']:>11.2f} {row['s_per_step']:>7.2f} "
                      f"{row['tokens_per_s']:>9.0f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1, default=str))


if __name__ == "__main__":
    main()
