"""Environment traps, each as one line naming the fix, found before anything heavy loads.

    python -m llava_sft.envcheck CONFIG [key=value ...]     (scripts/_launch.sh runs it before every launch)

prints `[envcheck] error: ...` / `[envcheck] warning: ...` per trap; exit 1 on any error, 0 otherwise, 2 when the
config itself does not load. The traps are things that would otherwise fail minutes into a job (or after a minute
of hub retries) with an error that does not name the setting:
  - model.vision.pretrained: CLIP weights not on local disk (offline: error; online: they will be downloaded)
  - model.llm.attn_implementation: flash_attention_2 without flash-attn or without CUDA
  - train.device: a GPU recipe on a machine without a visible CUDA GPU
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from dataclasses import dataclass
from typing import Literal

import yaml

from llava_sft.config import ConfigError, RunConfig, load_config

OPENCLIP_ENCODERS = ("openclip", "openclip_siglip")  # both hand `vision.pretrained` to open_clip.create_model


@dataclass
class Trap:
    key: str  # the config key at fault, e.g. "model.llm.attn_implementation"
    level: Literal["error", "warning"]
    message: str  # one line, including the fix


def clip_weights_trap(cfg: RunConfig) -> Trap | None:
    """open_clip weights (tag or file) that are not on local disk; no network access."""
    if cfg.model.vision.name not in OPENCLIP_ENCODERS or not cfg.model.vision.pretrained:
        return None
    from llava_sft.model.encoders.openclip import pretrained_problem  # imports open_clip only for a tag

    problem = pretrained_problem(cfg.model.vision)
    return Trap("model.vision.pretrained", *problem) if problem else None


def attn_trap(cfg: RunConfig, cuda: bool, flash_attn: bool) -> Trap | None:
    """flash_attention_2 needs the flash-attn package and a CUDA GPU; transformers fails at model load otherwise."""
    if cfg.model.llm.attn_implementation != "flash_attention_2":
        return None
    missing = [why for why, ok in (("flash-attn is not installed", flash_attn), ("no CUDA GPU is visible", cuda))
               if not ok]
    if not missing:
        return None
    return Trap("model.llm.attn_implementation", "error",
                f"model.llm.attn_implementation=flash_attention_2 but {' and '.join(missing)}: pip install -e "
                "'.[gpu]' (flash-attn) on a CUDA machine, or LLAVA_ATTN=sdpa / model.llm.attn_implementation=sdpa")


def gpu_trap(cfg: RunConfig, cuda: bool) -> Trap | None:
    """A GPU recipe (bf16 + DeepSpeed or bf16 weights) that would run, for days or not at all, on a CPU."""
    train = cfg.train
    if cuda or train.device == "cpu":
        return None
    gpu_recipe = train.bf16 and (bool(train.deepspeed) or cfg.model.llm.dtype == "bfloat16")
    # device=auto on a small bf16 config (the CPU demo: float32 weights, no DeepSpeed) just runs on the CPU;
    # device=cuda without CUDA fails whatever the recipe
    if train.device == "auto" and not gpu_recipe:
        return None
    return Trap("train.device", "error",
                f"no CUDA GPU visible (train.device={train.device}, a GPU recipe: bf16 with "
                f"{'DeepSpeed' if train.deepspeed else 'bfloat16 weights'}): run on a GPU node; to rehearse this "
                "recipe on a CPU use `bash scripts/stage1.sh --preflight ...` / `python -m llava_sft.preflight "
                "CONFIG`; to really train on the CPU set train.device=cpu")


def find_traps(cfg: RunConfig, cuda_available: bool | None = None,
               flash_attn_available: bool | None = None) -> list[Trap]:
    """Every trap of `cfg` in this environment; None = detect (torch.cuda / importlib, no import of flash_attn)."""
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    if flash_attn_available is None:
        flash_attn_available = importlib.util.find_spec("flash_attn") is not None
    traps = [clip_weights_trap(cfg), attn_trap(cfg, cuda_available, flash_attn_available),
             gpu_trap(cfg, cuda_available)]
    return [t for t in traps if t is not None]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llava_sft.envcheck", description=__doc__.split("\n")[0])
    parser.add_argument("config", help="run config YAML")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, as for llava_sft.train")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, OSError, yaml.YAMLError) as e:
        print(f"[envcheck] config error: {' '.join(str(e).split())}")  # one line
        return 2
    traps = find_traps(cfg)
    for trap in traps:
        print(f"[envcheck] {trap.level}: {trap.message}")
    if not traps:
        print("[envcheck] ok")
    return 1 if any(t.level == "error" for t in traps) else 0


if __name__ == "__main__":
    sys.exit(main())
