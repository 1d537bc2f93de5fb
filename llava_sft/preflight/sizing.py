"""The recipe at its real shapes: memory per GPU and time, from train/memory.py's arithmetic.

Inputs that the arithmetic cannot read from the config are stated where they are used:
* sequence length for memory: Stage 1 (`plain`) = one image's tokens + 64 text tokens (LLaVA-Pretrain captions
  are short); otherwise data.max_length (a micro-batch of modality-grouped long samples is padded to it);
* mean tokens per sample for time: Stage 1 = image tokens + 40; Stage 2 = 94 % image samples (mix665K: 40,688
  of 665,298 are text-only) x image tokens + 150 text tokens -- replace with the mean of your data when known;
* samples: the real JSON's record count when it is on disk, else the official count of the file it names
  (data_prep/check_layout.py's table).
"""
from __future__ import annotations

import math

from llava_sft.data.anyres import layout_for
from llava_sft.train import memory


def method_of(cfg) -> str:
    if not cfg.train.train_llm:
        return "projector"
    if cfg.model.lora is None:
        return "full"
    return "qlora" if cfg.model.lora.quantize else "lora"


def official_record_count(data_path: str) -> int | None:
    try:
        from data_prep.check_layout import DATA
    except ImportError:  # data_prep/ is beside the package in the repository, not installed with it
        return None
    for entry in DATA.values():
        if data_path.endswith(entry["json"]):
            return entry["records"]
    return None


def projector_params(kind: str, vision_width: int, llm_hidden: int) -> int:
    if kind == "linear":
        return vision_width * llm_hidden + llm_hidden
    depth = int(kind[3:kind.index("x")]) if kind.startswith("mlp") else 1
    return vision_width * llm_hidden + llm_hidden + (depth - 1) * (llm_hidden * llm_hidden + llm_hidden)


GPUS_PER_NODE = 8  # for the number of nodes that write a sharded checkpoint at once
WRITE_GB_PER_S_PER_NODE = 1.0  # a shared file system's sustained write per node, assumed (--write-gbps)
# AnyRes recipes: the image size the projection assumes -- COCO's most common, 640x480 (a 2 x 2 grid + the base view:
# 5 tower passes, 2340 tokens with LLaVA-1.6's pinpoints); the sizing table states it
ASSUMED_IMAGE_SIZE = (640, 480)


def checkpoint_size(method: str, engine: str, llm: dict, projector: int, lora_r: int, bf16: bool,
                    tower: int = 0) -> float:
    """Bytes of one periodic checkpoint (all ranks): each trainable parameter's weight, AdamW's two fp32 moments
    and, under bf16 or ZeRO, its fp32 master (train/memory.py's optimizer bytes); frozen weights are not saved.
    7B full Stage 2 under ZeRO-3 in bf16: 6.76e9 x (2 + 12) = 95 GB."""
    trainable = {"full": memory.llm_params(llm), "projector": 0}.get(method, memory.lora_params(llm, lora_r))
    trainable += projector + tower
    w = 2 if bf16 else 4
    o = 8 + (4 if bf16 or engine != "ddp" else 0)
    return float(trainable * (w + o))


def checkpoint_seconds(nbytes: float, engine: str, num_gpus: int, gb_per_s: float) -> float:
    """Time to write it: DDP's rank 0 writes everything; ZeRO and FSDP2 write each rank's shard at once, so every
    node writes its share in parallel."""
    writers = 1 if engine == "ddp" else math.ceil(num_gpus / GPUS_PER_NODE)
    return nbytes / 1e9 / (gb_per_s * writers)


def size(cfg, real_llm: dict, vision_arch: dict, zero_stage: int | None, checkpointing_active: bool,
         num_gpus: int, mfu: float, samples: int | None, write_gbps: float = WRITE_GB_PER_S_PER_NODE) -> dict:
    llm = memory.llm_shape(real_llm)
    v = vision_arch["vision_cfg"]
    grid = v["image_size"] // v["patch_size"]
    image_tokens = grid * grid + (1 if cfg.model.vision.select_feature == "cls_patch" else 0)
    tiles = 1  # tower passes per image
    layout = layout_for(cfg.model.image_aspect, v["image_size"], grid, cfg.model.image_grid_pinpoints,
                        cfg.model.unpad_rounding)
    if layout is not None:  # AnyRes: an image of ASSUMED_IMAGE_SIZE (its tokens and tiles: data/anyres.py)
        image_tokens, tiles = layout.image_tokens(ASSUMED_IMAGE_SIZE), layout.num_tiles(ASSUMED_IMAGE_SIZE)
    vision_params = memory.vit_params(v["width"], v["layers"], v["patch_size"], v["image_size"],
                                      vision_arch.get("embed_dim", 0))
    proj = projector_params(cfg.model.projector, v["width"], llm["hidden_size"])
    method, engine = method_of(cfg), {None: "ddp", 1: "zero2", 2: "zero2", 3: "zero3"}[zero_stage]
    stage1 = cfg.data.template == "plain"
    seq = image_tokens + 64 if stage1 else cfg.data.max_length
    bf16 = cfg.train.bf16
    lora_r = cfg.model.lora.r if cfg.model.lora else 0
    tower_trains = cfg.train.train_vision_tower
    states = memory.predicted_states_gb(method, engine, num_gpus, llm, vision_params, proj, lora_r, bf16, tower_trains)

    # labelled tokens per sample: Stage 1's caption (< 64 tokens); Stage 2 at worst every text token of a full row
    supervised = 64 if stage1 else seq - image_tokens

    # Stage 3 (DPO): a micro-batch of m pairs is 2m sequences through the LLM, its images encoded once; the reference
    # is a whole 16-bit copy per GPU (`copy`), the policy itself (`adapters_off`: no_grad, nothing kept), or a pass
    # before step 1 (`precomputed`: time, no memory)
    dpo = cfg.dpo
    sides = 2 if dpo is not None else 1
    reference_gib = (memory.llm_params(llm) + proj) * (2 if bf16 else 4) / memory.GIB \
        if dpo is not None and dpo.reference == "copy" else 0.0

    def peak(micro: int) -> float:
        tower = memory.tower_activations_gb(v["width"], v["layers"], grid * grid + 1, micro * tiles) if tower_trains else 0
        return states + reference_gib + tower + memory.predicted_activations_gb(llm, micro * sides, seq,
                                                                               checkpointing_active, bf16, supervised)

    def usable(m: int) -> bool:  # the global batch must split into whole accumulation steps on every GPU
        return cfg.data.packing or cfg.train.global_batch_size % (num_gpus * m) == 0

    gpus = {}
    for name, gpu in memory.GPUS.items():
        largest = next((m for m in range(cfg.train.micro_batch_size, 0, -1)
                        if usable(m) and memory.fits(peak(m), gpu)), 0)
        gpus[name] = {"peak_gib": round(peak(cfg.train.micro_batch_size), 1), "fits": memory.fits(peak(
            cfg.train.micro_batch_size), gpu), "largest_micro_batch_that_fits": largest}
    mean_tokens = image_tokens + 40 if stage1 else 0.94 * image_tokens + 150
    samples = samples or official_record_count(cfg.data.path or "")
    out = {"method": method, "engine": engine, "gpus_per_run": num_gpus, "micro_batch_size": cfg.train.micro_batch_size,
           "seq_for_memory": seq, "image_tokens": image_tokens, "tiles_per_image": tiles,
           "assumed_image_size": list(ASSUMED_IMAGE_SIZE) if layout is not None else None,
           "vision_trains": tower_trains, "llm_params": memory.llm_params(llm),
           "vision_params": vision_params, "projector_params": proj, "states_gib": round(states, 2),
           "activations_gib": round(peak(cfg.train.micro_batch_size) - states, 2),
           "checkpointing_in_projection": checkpointing_active, "gpus": gpus, "mfu": mfu, "samples": samples,
           "mean_tokens_per_sample": round(mean_tokens)}
    tower = vision_params if cfg.train.train_vision_tower else 0
    ckpt_bytes = checkpoint_size(method, engine, llm, proj, lora_r, bf16, tower)
    out["checkpoint_gb"] = round(ckpt_bytes / 1e9, 2)
    out["checkpoint_write_gbps_per_node"] = write_gbps
    out["checkpoint_seconds"] = round(checkpoint_seconds(ckpt_bytes, engine, num_gpus, write_gbps), 1)
    if dpo is not None:
        out["dpo_reference"] = dpo.reference
        out["reference_gib"] = round(reference_gib, 2)
    if samples:
        seen = cfg.train.max_steps * cfg.train.global_batch_size if cfg.train.max_steps else samples * cfg.train.epochs
        tokens = seen * mean_tokens * sides
        # weight gradients only for full fine-tuning: LoRA's adapters and Stage 1's projector are ~0.3 % of the LLM
        # the tower runs once per tile token (forward 2N, 6N when it trains)
        per_token = memory.flops_per_token(llm, round(mean_tokens), method == "full",
                                           vision_params * (3 if tower_trains else 1),
                                           tiles * grid * grid / mean_tokens if mean_tokens else 0.0)
        out["steps"] = cfg.train.max_steps or math.ceil(samples / cfg.train.global_batch_size) * math.ceil(cfg.train.epochs)
        hours = {name: memory.hours(tokens * per_token, num_gpus, gpu, mfu) for name, gpu in memory.GPUS.items()}
        out["hours"] = {name: round(h, 1) for name, h in hours.items()}
        if dpo is not None:  # the reference's forward passes: 2N + attention's forward per token (a third of 6N)
            forward = (2 * memory.llm_params(llm) + 4 * llm["num_hidden_layers"] * llm["hidden_size"] * mean_tokens
                       + 2 * vision_params * (tiles * grid * grid / mean_tokens if mean_tokens else 0.0))
            passes = samples * sides * mean_tokens * forward * (1 if dpo.reference == "precomputed" else
                                                               math.ceil(cfg.train.epochs))
            extra = {name: memory.hours(passes, num_gpus, gpu, mfu) for name, gpu in memory.GPUS.items()}
            if dpo.reference == "precomputed":  # once, before step 1 (then stored: reruns and resumes skip it)
                out["reference_pass_hours"] = {name: round(h, 2) for name, h in extra.items()}
            else:  # every step runs the reference's forward too
                hours = {name: h + extra[name] for name, h in hours.items()}
        out["hours"] = {name: round(h, 1) for name, h in hours.items()}
        out["seconds_per_step"] = {name: round(h * 3600 / out["steps"], 2) for name, h in hours.items()}
    return out


def sizing_table(s: dict, chosen: str) -> str:
    lines = [f"Real shapes: LLM {s['llm_params'] / 1e9:.2f}B ({s['method']}), vision {s['vision_params'] / 1e6:.0f}M "
             f"({'trained' if s.get('vision_trains') else 'frozen'}), projector {s['projector_params'] / 1e6:.1f}M; {s['engine']} over {s['gpus_per_run']} GPUs, "
             f"micro-batch {s['micro_batch_size']} x {s['seq_for_memory']} tokens, gradient checkpointing "
             f"{'on' if s['checkpointing_in_projection'] else 'OFF'} (as measured)",
             f"  model states {s['states_gib']} GiB + activations and logits {s['activations_gib']} GiB per GPU",
             f"  {'GPU':<11} {'peak GiB':>9} {'fits (90 %)':>12} {'largest micro':>14} {'s/step':>7} {'hours':>7}"]
    for name, g in s["gpus"].items():
        hours, step = s.get("hours", {}).get(name, "?"), s.get("seconds_per_step", {}).get(name, "?")
        mark = " <- --gpu" if name == chosen else ""
        lines.append(f"  {name:<11} {g['peak_gib']:>9} {'yes' if g['fits'] else 'NO':>12} "
                     f"{g['largest_micro_batch_that_fits']:>14} {step:>7} {hours:>7}{mark}")
    if s.get("assumed_image_size"):
        w, h = s["assumed_image_size"]
        lines.append(f"  AnyRes: each image assumed {w}x{h} px: {s['tiles_per_image']} tower passes, {s['image_tokens']} "
                     f"tokens (time and the trained tower's activations scale with them)")
    lines.append(f"  checkpoint: {s['checkpoint_gb']} GB (trainable weights, AdamW moments, fp32 masters), about "
                 f"{s['checkpoint_seconds']} s to write at {s['checkpoint_write_gbps_per_node']:g} GB/s per node "
                 f"(--write-gbps), plus the step in progress")
    if "dpo_reference" in s:
        lines.append(f"  DPO: each pair is two sequences (activations and time for both); reference "
                     f"{s['dpo_reference']}" + (f": a frozen copy, {s['reference_gib']} GiB per GPU" if
                                                s['dpo_reference'] == "copy" else "") +
                     (": one forward pass over the data before step 1, hours " + ", ".join(
                         f"{k} {v}" for k, v in s["reference_pass_hours"].items()) if "reference_pass_hours" in s
                      else ""))
    if "hours" in s:
        lines.append(f"  hours: {s['samples']:,} samples x {s['mean_tokens_per_sample']} tokens (assumed mean), "
                     f"{s['steps']} steps, at MFU {s['mfu']:.2f}")
    else:
        lines.append("  hours: not projected (unknown number of samples: the data JSON is not on disk)")
    return "\n".join(lines)

