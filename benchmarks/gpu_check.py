"""The checks that need a GPU, in one command of under 10 minutes (benchmarks/gpu_check.sh runs it).

    bash benchmarks/gpu_check.sh                   # on a machine with one CUDA GPU: prints a table, writes JSON
    python benchmarks/gpu_check.py --smoke         # the same code path at tiny shapes on a CPU (CI runs this)

1. packed == unpacked in bf16: per-sample logits of a packed row (flash-attn varlen when flash-attn is installed,
   else SDPA with the block-causal mask) against the same samples run one by one. Tolerance: bf16 keeps 8 mantissa
   bits (relative step 2^-8 = 0.4 %); two kernels summing in different orders differ by a few steps per layer, so
   the check is max |logit difference| <= 0.05 x max |logit| + 0.05. The argmax agreement is reported, not
   checked: a random-weight LLM's top logits are nearly tied (on an H200, 2026-11-30: 96.5 % agreement at a max
   difference of 0.09 against logits up to 7.0), so bf16 noise flips its argmax without anything being wrong.
2. A Stage-2 step at the 7B layer shape (Vicuna-7B width: hidden 4096, MLP 11008, 32 heads, vocabulary 32,000;
   `--layers` decoder layers instead of 32; CLIP ViT-L/14-336 at random weights) through the real trainer
   (`python -m llava_sft.train`, LLM loaded from a directory in bf16, gradient checkpointing, ZeRO-3 when DeepSpeed
   works here, else one plain process): peak memory against train/memory.py's prediction, tokens/s, MFU and HFU.
3. Padded vs packed throughput on the mix665K length profile (benchmarks/packing.py at the same shape; goal
   packed >= 1.6x padded).
4. The Stage-2 steps of 2 again with `train.gradient_checkpointing: false`: the peak with checkpointing must be lower.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llava_sft.constants import IMAGE_TOKEN_INDEX  # noqa: E402

VICUNA_7B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
             "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096,
             "tie_word_embeddings": False}
TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 4, "vocab_size": 1000, "max_position_embeddings": 2048, "tie_word_embeddings": False}


CHECKS = ("packed_equals_unpacked", "stage2_step", "packing_throughput", "checkpointing_memory")


def flash_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


# ---------------------------------------------------------------------------------------------- 1
def packed_equals_unpacked(args, device) -> dict:
    from llava_sft.data.packing import PackingCollator
    from llava_sft.model.llava import LlavaModel, LLMConfig, ModelConfig

    attn = "flash_attention_2" if flash_available() else "sdpa"
    shape = dict(TINY if args.smoke else VICUNA_7B, num_hidden_layers=2)
    dtype = "float32" if args.smoke else "bfloat16"
    torch.manual_seed(0)
    model = LlavaModel(ModelConfig(vision=vision_config(args), llm=LLMConfig(config=shape, attn_implementation=attn,
                                                                                dtype=dtype)))
    model = model.to(device).eval()
    if not args.smoke:
        model = model.to(torch.bfloat16)
    size, tpi = model.vision_tower.image_size, model.tokens_per_image
    gen = torch.Generator().manual_seed(1)
    samples = []
    for k, (text, images) in enumerate([(40, 1), (200, 0), (90, 1), (17, 0)]):
        ids = torch.randint(3, shape["vocab_size"], (text + images,), generator=gen)
        ids[0] = 1
        ids[1:1 + images] = IMAGE_TOKEN_INDEX
        samples.append({"id": str(k), "input_ids": ids, "labels": ids.clone(), "truncated": False,
                        "images": torch.randn(images, 3, size, size, generator=gen)})
    [packed] = PackingCollator(0, tpi, 8192, 1)(samples)
    with torch.no_grad():
        logits, _ = model.logits_and_labels(*(packed[k].to(device) for k in ("input_ids", "attention_mask", "images")))
        logits = logits.float().reshape(-1, logits.shape[-1])
        if attn != "flash_attention_2":  # [1, T, V] with padding at the end of the row: keep the real tokens
            real = int(packed["attention_mask"].ne(0).sum()) + packed["images"].shape[0] * (tpi - 1)
            logits = logits[:real]
        singles = []
        for k in packed_order(packed, samples):  # the row holds the samples in the packer's order

            s = samples[k]
            one, _ = model.logits_and_labels(s["input_ids"][None].to(device),
                                             torch.ones(1, len(s["input_ids"]), dtype=torch.long, device=device),
                                             s["images"].to(device))
            singles.append(one.float()[0])
    singles = torch.cat(singles)
    diff = (logits - singles).abs().max().item()
    scale = singles.abs().max().item()
    agree = (logits.argmax(-1) == singles.argmax(-1)).float().mean().item()
    ok = diff <= 0.05 * scale + 0.05
    return {"attention": attn, "dtype": dtype, "max_abs_diff": round(diff, 4), "max_abs_logit": round(scale, 3),
            "argmax_agreement": round(agree, 4), "ok": ok}


def packed_order(packed: dict, samples: list[dict]) -> list[int]:
    """Which sample each segment of the packed row is, matched by its token ids."""
    ids, segments = packed["input_ids"][0], packed["attention_mask"][0]
    order = []
    for segment in range(1, int(segments.max()) + 1):
        seg = ids[segments == segment]
        order.append(next(k for k, s in enumerate(samples) if torch.equal(s["input_ids"], seg)))
    return order


# ---------------------------------------------------------------------------------------------- 2
def vision_config(args):
    from llava_sft.model.vision import VisionConfig

    if args.smoke:
        return VisionConfig(model="tiny-vit", pretrained=None, model_config_file=str(REPO / "configs/demo/tiny-vit.json"))
    return VisionConfig(model="ViT-L-14-336", pretrained=None)


def stage2_step(args, work: Path, device, checkpointing: bool = True) -> dict:
    fsdp2 = args.engine == "fsdp2"
    from transformers import AutoConfig, AutoModelForCausalLM

    from data_prep.make_shapes import generate as make_shapes
    from llava_sft.config import RunConfig, from_dict, save_config
    from llava_sft.data.tokenizer_train import demo_corpus, train_llama_tokenizer
    from llava_sft.train import memory

    shape = dict(TINY if args.smoke else VICUNA_7B, num_hidden_layers=args.layers)
    run = ("run" if checkpointing else "run_no_checkpointing") + ("_fsdp2" if args.engine == "fsdp2" else "")
    llm_dir, tok_dir, data = work / "llm", work / "tokenizer", work / "data"
    if not (llm_dir / "config.json").exists():
        config = AutoConfig.for_model(**shape)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32 if args.smoke else torch.bfloat16) \
            .save_pretrained(llm_dir)
    if not (tok_dir / "tokenizer.model").exists():
        train_llama_tokenizer(demo_corpus(400), tok_dir)
    image_size = 48 if args.smoke else 336
    if not (data / "stage2.json").exists():
        make_shapes(data, seed=0, image_size=image_size, n_stage1=4, n_stage2=args.micro * (args.steps + 1), n_eval=2,
                    text_only_frac=0.06)
    deepspeed = None if args.smoke or fsdp2 or not deepspeed_works() else "configs/deepspeed/zero3.json"
    vision = vision_config(args)
    cfg = from_dict(RunConfig, {
        "run_name": "gpu_check",
        "model": {"vision": {"name": "openclip", "model": vision.model, "pretrained": None,
                             "model_config_file": vision.model_config_file},
                  # without DeepSpeed nothing keeps fp32 master weights of a bf16 LLM, and the trainer refuses
                  # (check_master_weights): then the weights are fp32 and train.bf16 computes in bf16
                  # (FSDP2 upcasts to fp32 masters itself: the LLM loads in bf16, as the recipes load it)
                  "llm": {"path": str(llm_dir), "dtype": "bfloat16" if deepspeed or fsdp2 and not args.smoke else "float32",
                          "attn_implementation": "flash_attention_2" if flash_available() else "sdpa"},
                  "tokenizer": str(tok_dir), "projector": "mlp2x_gelu"},
        "data": {"path": str(data / "stage2.json"), "image_folder": str(data / "images"), "template": "vicuna_v1",
                 "max_length": 2048, "num_workers": 2},
        "train": {"output_dir": str(work / run), "train_projector": True, "train_llm": True, "lr": 2e-5,
                  "global_batch_size": args.micro, "micro_batch_size": args.micro, "max_steps": args.steps,
                  "warmup_ratio": 0.0, "gradient_checkpointing": checkpointing, "resume": "never", "deepspeed": deepspeed, "engine": "fsdp2" if fsdp2 else "auto",
                  "device": "cpu" if args.smoke else "cuda", "save_every_minutes": 0},
    })
    config = work / f"{run}.yaml"
    save_config(cfg, config)
    env = dict(os.environ, PYTHONPATH=python_path(), LLAVA_SKIP_ENVCHECK="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", "29611",
               "-m", "llava_sft.train", str(config)]
    t0 = time.time()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode:
        return {"ok": False, "error": done.stderr[-3000:]}
    rows = [json.loads(line) for line in (work / run / "metrics.jsonl").read_text().splitlines()]
    later = rows[1:] or rows
    llm = memory.llm_shape(shape)
    from llava_sft.train.memory import vit_params

    vision_params = vit_params(64 if args.smoke else 1024, 3 if args.smoke else 24, 16 if args.smoke else 14,
                               image_size)
    hidden = shape["hidden_size"]
    projector = 1024 * hidden + hidden * hidden if not args.smoke else 64 * hidden + hidden * hidden
    seq = max(1, round(sum(r["tokens"] for r in later) / sum(r["samples"] for r in later)))
    engine = "fsdp2" if fsdp2 else "zero3" if deepspeed else "ddp"
    predicted = memory.predicted_states_gb("full", engine, 1, llm, vision_params, projector, 0,
                                           deepspeed is not None or fsdp2) + memory.predicted_activations_gb(llm, args.micro, seq, checkpointing, True)
    return {"ok": True, "engine": engine, "checkpointing": checkpointing, "layers": args.layers, "micro": args.micro,
            "mean_tokens_per_sample": seq, "peak_mem_gb": max(r["peak_mem_gb"] for r in rows if "peak_mem_gb" in r),
            "predicted_gb": round(predicted, 2), "tokens_per_s": round(sum(r["tokens_per_s"] for r in later) / len(later)),
            "mfu": later[-1].get("mfu"), "hfu": later[-1].get("hfu"), "wall_s": round(time.time() - t0)}


def python_path() -> str:
    """The repository first, then whatever PYTHONPATH already holds (packages carried to a bare GPU machine)."""
    return os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)


def deepspeed_works() -> bool:
    try:
        import deepspeed  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


def checkpointing_saves_memory(args, work: Path, device, with_checkpointing: dict) -> dict:
    """The same Stage-2 steps with `train.gradient_checkpointing: false`: checkpointing is a memory measurement,
    so the peak with it must be lower than the peak without it."""
    without = stage2_step(args, work, device, checkpointing=False)
    if not (without.get("ok") and with_checkpointing.get("ok")):
        return {"ok": False, "error": without.get("error", "the run with checkpointing failed")}
    on, off = with_checkpointing["peak_mem_gb"], without["peak_mem_gb"]
    # at tiny shapes on a CPU the peak is the process's resident memory, which activations barely move
    return {"ok": on < off or args.smoke, "peak_mem_gb_on": on, "peak_mem_gb_off": off, "predicted_gb_off": without["predicted_gb"],
            "tokens_per_s_on": with_checkpointing["tokens_per_s"], "tokens_per_s_off": without["tokens_per_s"]}


# ---------------------------------------------------------------------------------------------- 3
def packing_throughput(args, work: Path) -> dict:
    out = work / "packing.json"
    shape = (["--llm-hidden", "64", "--llm-layers", "2", "--llm-heads", "4", "--llm-inter", "128", "--samples", "2000",
              "--steps", "1", "--scale", "0.125"] if args.smoke else
             ["--vision", "ViT-L-14-336", "--llm-hidden", "4096", "--llm-layers", str(args.layers), "--llm-heads", "32",
              "--llm-inter", "11008", "--scale", "1", "--micro", "16", "--pack-max-tokens", "4096", "--device", "cuda",
              "--steps", "3", "--gradient-checkpointing", "--attn",
              "flash_attention_2" if flash_available() else "sdpa"])
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "packing.py"), *shape, "--json", str(out)],
                          cwd=REPO, env=dict(os.environ, PYTHONPATH=python_path()), capture_output=True, text=True)
    if done.returncode:
        return {"ok": False, "error": done.stderr[-3000:]}
    result = json.loads(out.read_text())
    speed = result.get("throughput", {})
    padded, packed = speed.get("padded", {}).get("tokens_per_s"), speed.get("packed", {}).get("tokens_per_s")
    ratio = speed.get("speedup")
    return {"ok": ratio is not None and (args.smoke or ratio >= 1.6), "padded_tokens_per_s": round(padded or 0),
            "packed_tokens_per_s": round(packed or 0), "ratio": round(ratio, 2) if ratio else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on a CPU: checks the script, measures nothing")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers at the 7B width")
    ap.add_argument("--micro", type=int, default=16)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--work", type=Path, default=Path("/tmp/llava_sft_gpu_check"))
    ap.add_argument("--json", type=Path, default=Path("gpu_check.json"))
    ap.add_argument("--only", nargs="+", choices=CHECKS, help="run these checks alone (default: all)")
    ap.add_argument("--engine", choices=["auto", "fsdp2"], default="auto",
                    help="the Stage-2 steps' engine: auto = ZeRO-3 where DeepSpeed works, else one plain process")
    args = ap.parse_args()
    if args.smoke:
        args.layers, args.micro, args.steps = 2, 2, 2
    elif not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA GPU here (use --smoke to check the script on a CPU)")
    device = torch.device("cpu" if args.smoke else "cuda")
    args.work.mkdir(parents=True, exist_ok=True)
    results = {"device": "cpu" if args.smoke else torch.cuda.get_device_name(0), "torch": torch.__version__,
               "flash_attn": flash_available()}
    for name, check in (("packed_equals_unpacked", lambda: packed_equals_unpacked(args, device)),
                        ("stage2_step", lambda: stage2_step(args, args.work, device)),
                        ("packing_throughput", lambda: packing_throughput(args, args.work)),
                        ("checkpointing_memory",
                         lambda: checkpointing_saves_memory(args, args.work, device, results["stage2_step"]))):
        if args.only and name not in args.only and not (name == "stage2_step" and "checkpointing_memory" in args.only):
            continue
        t0 = time.time()
        try:
            results[name] = check()
        except Exception as e:  # one failing check must not hide the others' numbers
            results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        results[name]["seconds"] = round(time.time() - t0, 1)
        print(f"{name:<24} {'ok' if results[name].get('ok') else 'FAILED':<7} "
              f"{json.dumps({k: v for k, v in results[name].items() if k not in ('ok', 'error')})}", flush=True)
        if results[name].get("error"):
            print(results[name]["error"], file=sys.stderr)
        args.json.write_text(json.dumps(results, indent=1))  # after each check: a run cut short keeps what it has
    print(f"wrote {args.json}")
    sys.exit(0 if all(results[k].get("ok") for k in CHECKS if k in results) else 1)


if __name__ == "__main__":
    main()
