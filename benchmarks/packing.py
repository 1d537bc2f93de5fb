"""Padded vs packed batches (data.packing): real-token fraction and training throughput.

    python benchmarks/packing.py                                   # synthetic mix665K-like profile, tiny model, CPU
    python benchmarks/packing.py --data llava_v1_5_mix665k.json --tokenizer /models/vicuna-7b-v1.5   # measured lengths
    python benchmarks/packing.py --scale 1 --vision ViT-L-14-336 --llm-hidden 4096 \\
        --llm-layers 32 --llm-heads 32 --llm-inter 11008 --micro 16 --pack-max-tokens 4096 --device cuda \\
        --attn flash_attention_2                                   # a 7B-shaped run (random weights)

Two parts, on the same global batches (the trainer's BatchPlan; packing: the trainer's PackingCollator):

1. Real-token fraction at full size: sample lengths after image expansion (576 tokens per image, as
   CLIP ViT-L/14-336) for an epoch of global batches. Padded: micro-batches of `--micro` samples padded to
   their longest (LLaVA's layout; `--group-by-modality` sorts each global batch by length as LLaVA-1.5
   does). Packed: each rank's share in rows of `--pack-max-tokens`, `--rows` rows per forward pass, padded
   to the longest row (what sdpa computes on; the flash path drops even that padding, fraction 1).
2. Throughput: `--steps` training steps (forward + backward, Stage 2: projector + LLM train) of a model with
   random weights, padded vs packed, on rank 0's share of each global batch (the same samples in both modes:
   the packed, strided share, cut into `--micro`-sample padded micro-batches), scaled to the model: each image becomes the
   tower's own number of tokens and text lengths are multiplied by `--scale` (on CPU a tiny model and short
   texts; with `--device cuda` and `--scale 1` the real shape). Tokens/s counts real tokens only.

Length profile without --data (synthetic, a documented guess at mix665K's shape, not a measurement): 6 % of
the samples are text-only (ShareGPT in mix665K: 40,688 of 665,298) with log-normal text lengths, median 500
tokens, sigma 0.9, clipped to [16, 2048]; the others hold one image (576 tokens) plus log-normal text,
median 160 tokens, sigma 0.9, clipped to [16, 2048 - 576] (short VQA answers to long LLaVA-Instruct
conversations). With --data the lengths are measured: every record tokenized with the run's template and
tokenizer, cut to --max-length like the trainer's over-long policy.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time

import torch

from llava_sft.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava_sft.data.dataset import Collator
from llava_sft.data.packing import PackingCollator, token_counts
from llava_sft.data.sampler import BatchPlan

IMAGE_TOKENS = 576


# ------------------------------------------------------------------------------------------- lengths
def synthetic_profile(n: int, seed: int, max_length: int) -> list[tuple[int, int]]:
    """[(text tokens, images)] of the synthetic mix665K-like profile (module docstring)."""
    rng = random.Random(seed)

    def lognormal(median: float, hi: int) -> int:
        return max(16, min(hi, round(median * math.exp(0.9 * rng.gauss(0, 1)))))

    return [(lognormal(500, max_length), 0) if rng.random() < 0.06 else
            (lognormal(160, max_length - IMAGE_TOKENS), 1) for _ in range(n)]


def measured_profile(path: str, tokenizer_dir: str, template: str, max_length: int, limit: int | None,
                     seed: int) -> list[tuple[int, int]]:
    """[(text tokens, images)] of a LLaVA JSON, tokenized as the trainer does (bad records skipped)."""
    from llava_sft.data.dataset import image_list
    from llava_sft.data.templates import BadSampleError, get_template
    from llava_sft.data.tokenize import tokenize_conversation
    from llava_sft.model.llava import load_tokenizer

    records = json.loads(open(path).read())
    if limit and limit < len(records):
        records = random.Random(seed).sample(records, limit)
    tokenizer, chat = load_tokenizer(tokenizer_dir), get_template(template)
    out = []
    for r in records:
        try:
            images = len(image_list(r))
            ids, _ = tokenize_conversation(r["conversations"], tokenizer, chat, num_images=images)
        except (BadSampleError, KeyError, TypeError):
            continue
        text = len(ids) - images
        out.append((min(text, max_length - IMAGE_TOKENS * images), images))
    return out


# ------------------------------------------------------------------------------------------ batches
def fake_sample(i: int, text: int, images: int, vocab: int, image_size: int) -> dict:
    gen = torch.Generator().manual_seed(i)
    ids = torch.randint(3, vocab, (text + images,), generator=gen)
    ids[1:1 + images] = IMAGE_TOKEN_INDEX
    labels = ids.clone()
    labels[: max(1 + images, len(ids) // 2)] = IGNORE_INDEX  # the second half is the reply
    return {"id": str(i), "input_ids": ids, "labels": labels, "truncated": False,
            "images": torch.randn(images, 3, image_size, image_size, generator=gen)}


def steps(profile, args, image_tokens: int, world_ranks: range, strided: bool = False):
    """Per step: the padded micro-batches (lists of indices) and the packed shares of `world_ranks`.
    `strided`: padded shares strided as packed ones (the same samples per rank in both modes)."""
    lengths = [t + images * image_tokens for t, images in profile]
    has_image = [images > 0 for _, images in profile]
    padded, packed = [], []
    for rank in world_ranks:
        plain = BatchPlan(lengths, has_image, args.global_batch, args.micro, args.world, rank, args.seed,
                          args.group_by_modality, strided_shares=strided)
        share = BatchPlan(lengths, has_image, args.global_batch, args.global_batch // args.world, args.world, rank,
                          args.seed, args.group_by_modality, strided_shares=True)
        for s, gb in enumerate(plain.global_batches(0)):
            if rank == world_ranks[0]:
                padded.append([])
                packed.append([])
            padded[s] += plain.micro_batches(gb)
            packed[s].append(share.micro_batches(gb)[0])
    return padded, packed


def fractions(profile, args, image_tokens: int) -> dict:
    """Real-token fraction, forward passes per step per rank and the largest forward (tokens), both modes."""
    padded, packed = steps(profile, args, image_tokens, range(args.world))
    lengths = [t + images * image_tokens for t, images in profile]
    from llava_sft.data.packing import pack_rows

    real = pad_slots = pack_slots = passes = 0
    largest = {"padded": 0, "packed": 0}
    for micro, shares in zip(padded, packed, strict=True):
        for mb in micro:
            real += sum(lengths[i] for i in mb)
            width = max(lengths[i] for i in mb)
            pad_slots += width * len(mb)
            largest["padded"] = max(largest["padded"], width * len(mb))
        for share in shares:
            rows = [sum(lengths[share[i]] for i in row) for row in pack_rows([lengths[i] for i in share],
                                                                                    args.pack_max_tokens)]
            for k in range(0, len(rows), args.rows):
                group = rows[k:k + args.rows]
                pack_slots += max(group) * len(group)
                largest["packed"] = max(largest["packed"], max(group) * len(group))
                passes += 1
    n_steps = len(padded)
    return {"steps": n_steps, "real_token_frac_padded": real / pad_slots, "real_token_frac_packed": real / pack_slots,
            "forward_passes_per_rank_step_padded": args.global_batch // (args.world * args.micro),
            "forward_passes_per_rank_step_packed": passes / (n_steps * args.world),
            "largest_forward_tokens_padded": largest["padded"], "largest_forward_tokens_packed": largest["packed"]}


# ----------------------------------------------------------------------------------------- throughput
def build_model(args):
    from llava_sft.model.llava import LlavaModel, LLMConfig, ModelConfig
    from llava_sft.model.vision import VisionConfig

    vision = (VisionConfig(model="tiny-vit", pretrained=None, model_config_file="configs/demo/tiny-vit.json")
              if args.vision == "tiny" else VisionConfig(model=args.vision, pretrained=None))
    llm = LLMConfig(config={"model_type": "llama", "hidden_size": args.llm_hidden, "intermediate_size": args.llm_inter,
                            "num_hidden_layers": args.llm_layers, "num_attention_heads": args.llm_heads,
                            "num_key_value_heads": args.llm_heads, "vocab_size": args.vocab,
                            "max_position_embeddings": 8192}, attn_implementation=args.attn)
    model = LlavaModel(ModelConfig(vision=vision, llm=llm)).to(args.device)
    model.set_trainable(True, True)
    if args.gradient_checkpointing:
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def throughput(profile, args) -> dict:
    from llava_sft.train.trainer import DDPEngine, accumulate_gradients

    device = torch.device(args.device)
    model = build_model(args)
    tpi, size = model.tokens_per_image, model.vision_tower.image_size
    scaled = [(max(8, round(t * args.scale)), images) for t, images in profile]
    # rank 0 of `--world`: one process's work per step, the same samples in both modes
    padded, packed = steps(scaled, args, tpi, range(1), strided=True)
    n = min(args.steps + 1, len(padded))
    samples = {}

    def get(i):
        if i not in samples:
            samples[i] = fake_sample(i, *scaled[i], args.vocab, size)
        return samples[i]

    budget = max(args.pack_max_tokens * args.scale, max(t + im * tpi for t, im in scaled))
    collate, pack = Collator(0), PackingCollator(0, tpi, int(budget), args.rows)
    out = {}
    for mode in ("padded", "packed"):
        times, real, slots = [], 0, 0
        for s in range(n):
            micro = ([collate([get(i) for i in mb]) for mb in padded[s]] if mode == "padded"
                     else pack([get(i) for i in packed[s][0]]))
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                accumulate_gradients(DDPEngine.local(model), micro, device, use_autocast=device.type == "cuda")
            model.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if s:  # the first step is warm-up
                times.append(time.perf_counter() - t0)
                for b in micro:
                    r, c = token_counts(b, tpi)
                    real, slots = real + r, slots + c
        out[mode] = {"s_per_step": sum(times) / len(times), "tokens_per_s": real / sum(times),
                     "real_token_frac": real / slots}
    out["speedup"] = out["packed"]["tokens_per_s"] / out["padded"]["tokens_per_s"]
    out["shape"] = {"tokens_per_image": tpi, "text_scale": args.scale, "pack_max_tokens": int(budget),
                    "llm_params_M": round(sum(p.numel() for p in model.llm.parameters()) / 1e6, 1)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="LLaVA JSON to measure lengths from (default: the synthetic profile)")
    ap.add_argument("--tokenizer", help="tokenizer directory (needed with --data)")
    ap.add_argument("--template", default="vicuna_v1")
    ap.add_argument("--limit", type=int, default=20000, help="records sampled from --data (0 = all)")
    ap.add_argument("--samples", type=int, default=20000, help="synthetic samples")
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--global-batch", type=int, default=128)
    ap.add_argument("--world", type=int, default=8, help="ranks sharing a global batch")
    ap.add_argument("--micro", type=int, default=16, help="padded: samples per micro-batch")
    ap.add_argument("--pack-max-tokens", type=int, default=4096)
    ap.add_argument("--rows", type=int, default=1, help="packed: rows per micro-batch (train.micro_batch_size)")
    ap.add_argument("--group-by-modality", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    # throughput part
    ap.add_argument("--steps", type=int, default=3, help="timed steps per mode (0: fractions only)")
    ap.add_argument("--scale", type=float, default=1 / 8, help="text lengths x this in the throughput part")
    ap.add_argument("--vision", default="tiny", help="'tiny' (configs/demo/tiny-vit.json) or an open_clip model name")
    ap.add_argument("--llm-hidden", type=int, default=256)
    ap.add_argument("--llm-layers", type=int, default=4)
    ap.add_argument("--llm-heads", type=int, default=4)
    ap.add_argument("--llm-inter", type=int, default=704)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--attn", default="sdpa", help="sdpa, eager or flash_attention_2 (CUDA, flash-attn installed)")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.global_batch % (args.world * args.micro):
        ap.error("--global-batch must be a multiple of --world x --micro")
    if args.data:
        if not args.tokenizer:
            ap.error("--data needs --tokenizer (lengths are measured in tokens)")
        profile = measured_profile(args.data, args.tokenizer, args.template, args.max_length, args.limit or None,
                                   args.seed)
        source = f"{args.data} ({len(profile)} records, tokenized)"
    else:
        profile = synthetic_profile(args.samples, args.seed, args.max_length)
        source = f"synthetic mix665K-like profile ({len(profile)} samples)"
    text_only = sum(images == 0 for _, images in profile) / len(profile)
    full = [t + images * IMAGE_TOKENS for t, images in profile]
    print(f"lengths: {source}; text-only {text_only:.1%}; tokens after image expansion: mean {sum(full) / len(full):.0f}, "
          f"median {sorted(full)[len(full) // 2]}, max {max(full)}")
    result = {"source": source, "text_only_share": text_only, "args": vars(args)}
    frac = fractions(profile, args, IMAGE_TOKENS)
    result["full_size"] = frac
    print(f"\nfull size ({IMAGE_TOKENS} tokens per image), global batch {args.global_batch} over {args.world} rank(s), "
          f"{frac['steps']} steps{', grouped by modality' if args.group_by_modality else ''}:")
    print(f"  padded, {args.micro} samples per micro-batch:  real-token fraction "
          f"{frac['real_token_frac_padded']:.3f}, {frac['forward_passes_per_rank_step_padded']} forward passes per rank "
          f"and step, largest forward {frac['largest_forward_tokens_padded']} token slots")
    print(f"  packed, {args.rows} row(s) of {args.pack_max_tokens} per micro-batch: real-token fraction "
          f"{frac['real_token_frac_packed']:.3f}, {frac['forward_passes_per_rank_step_packed']:.2f} forward passes per "
          f"rank and step, largest forward {frac['largest_forward_tokens_packed']} token slots")
    if args.steps:
        tp = throughput(profile, args)
        result["throughput"] = tp
        print(f"\nthroughput, {args.device}, {args.attn}, Stage 2 forward+backward, one rank's share per step "
              f"(LLM {tp['shape']['llm_params_M']}M params, {tp['shape']['tokens_per_image']} tokens per image, text "
              f"x{args.scale:g}, rows of {tp['shape']['pack_max_tokens']}), {args.steps} timed steps:")
        print(f"  {'mode':<8} {'s/step':>8} {'tokens/s':>10} {'real-token fraction':>20}")
        for mode in ("padded", "packed"):
            r = tp[mode]
            print(f"  {mode:<8} {r['s_per_step']:>8.3f} {r['tokens_per_s']:>10.0f} {r['real_token_frac']:>20.3f}")
        print(f"  packed / padded tokens/s: {tp['speedup']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
