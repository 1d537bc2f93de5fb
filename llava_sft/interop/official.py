"""Official LLaVA checkpoints -> our formats, to evaluate released models with our harness or train on from them.

* A LLaVA-1.5 release (`liuhaotian/llava-v1.5-7b`): `config.json` of a `LlavaLlamaForCausalLM` (the LLM's
  fields + `mm_vision_tower`, `mm_vision_select_layer`, `mm_vision_select_feature`, `mm_projector_type`,
  `image_aspect_ratio`, ...), weights with the LLM under `model.*`/`lm_head.*` and the projector under
  `model.mm_projector.*`, the tokenizer. The CLIP tower is not in it: it is loaded from `mm_vision_tower`
  (an HF CLIP directory or hub id; `vision_tower=` gives a local copy) as our `hf_clip` encoder.
  -> our model directory (the one `generate`, `eval` and Stage-2 training load).
* A LLaVA-Pretrain projector (`mm_projector.bin`, keys `model.mm_projector.*`, with the run's `config.json`
  next to it when there is one) -> our Stage-1 output (`projector.safetensors` + `llava_config.json`), the
  `train.pretrained_projector` of a Stage-2 run.

* A LLaVA-1.6 release (`liuhaotian/llava-v1.6-vicuna-7b`): the same, with `image_aspect_ratio: anyres`,
  `mm_patch_merge_type: spatial_unpad`, `image_grid_pinpoints` ((width, height), as ours) and the
  `model.image_newline` weight; its trained tower is in the checkpoint. -> `image_aspect: anyres`, LLaVA's unpad
  rounding (`reference`).

Refused with a reason: `mm_use_im_start_end` (image start/end tokens), `image_aspect_ratio` other than
`pad`/`square`/`anyres`, `anyres` with another merge than `spatial_unpad`, and towers that are not CLIP.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from llava_sft.interop.clip_convert import UnsupportedConversion
from llava_sft.model.llava import (
    CONFIG_FILE,
    DTYPES,
    PROJECTOR_FILE,
    LlavaModel,
    LLMConfig,
    ModelConfig,
    load_tokenizer,
)
from llava_sft.model.vision import VisionConfig, build_vision_tower

log = logging.getLogger(__name__)

PROJECTOR_PREFIX, TOWER_PREFIX, NEWLINE = "model.mm_projector.", "model.vision_tower.vision_tower.", "model.image_newline"
ARCHITECTURES = {"LlavaLlamaForCausalLM": "llama", "LlavaMistralForCausalLM": "mistral", "LlavaQwenForCausalLM": "qwen2"}
LLAVA_ONLY_KEYS = {"image_aspect_ratio", "image_grid_pinpoints", "image_split_resolution", "freeze_mm_mlp_adapter", "tune_mm_mlp_adapter",
                   "unfreeze_mm_vision_tower", "use_mm_proj", "tokenizer_model_max_length", "tokenizer_padding_side",
                   "_name_or_path", "architectures", "model_type", "transformers_version", "torch_dtype", "dtype"}


def read_llava_config(model_dir: Path) -> dict:
    cfg = json.loads((model_dir / "config.json").read_text())
    if cfg.get("mm_use_im_start_end"):
        raise UnsupportedConversion("mm_use_im_start_end=true (image start/end tokens) is not supported")
    return cfg


def image_aspect(cfg: dict) -> str:
    ratio = cfg.get("image_aspect_ratio") or "square"
    if ratio not in ("pad", "square", "anyres"):
        raise UnsupportedConversion(f"image_aspect_ratio {ratio!r} is not supported (only 'pad', 'square', 'anyres')")
    merge = cfg.get("mm_patch_merge_type", "flat")
    if ratio == "anyres" and merge != "spatial_unpad":
        raise UnsupportedConversion(f"image_aspect_ratio 'anyres' with mm_patch_merge_type {merge!r}: only "
                                    f"'spatial_unpad' (LLaVA-1.6's) imports")
    return ratio


def vision_config(cfg: dict, vision_tower: str | None) -> VisionConfig:
    """Our `hf_clip` encoder for the CLIP tower the checkpoint names (or its local copy `vision_tower`)."""
    from transformers import AutoConfig
    from transformers.utils import cached_file

    source = vision_tower or cfg.get("mm_vision_tower") or cfg.get("vision_tower")
    if not source:
        raise UnsupportedConversion("the checkpoint names no vision tower (mm_vision_tower): pass --vision-tower DIR")
    try:
        config_file = cached_file(source, "config.json")
        model_type = AutoConfig.from_pretrained(source).model_type
    except OSError as err:
        raise FileNotFoundError(f"vision tower {source!r} (mm_vision_tower) cannot be read ({err}); without a hub, "
                                f"pass a local copy of it: --vision-tower DIR") from err
    if model_type not in ("clip", "clip_vision_model"):
        raise UnsupportedConversion(f"vision tower {source!r} is a {model_type!r} model; only CLIP towers import")
    return VisionConfig(name="hf_clip", model=str(source), pretrained=str(source), model_config_file=config_file,
                        select_layer=int(cfg.get("mm_vision_select_layer", -2)),
                        select_feature=cfg.get("mm_vision_select_feature", "patch"))


def load_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """All weights of a checkpoint directory (safetensors or pytorch_model*.bin, sharded or not)."""
    files = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"no model weights (*.safetensors, pytorch_model*.bin) in {model_dir}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)) if file.suffix == ".safetensors" else torch.load(file, map_location="cpu",
                                                                                        weights_only=True))
    return state


def projector_kind(state: dict[str, torch.Tensor]) -> str:
    """Our projector key for `mm_projector` weights (keys without the prefix)."""
    if set(state) == {"weight", "bias"}:
        return "linear"
    layers = sorted({int(m.group(1)) for k in state if (m := re.match(r"^(\d+)\.(weight|bias)$", k))})
    if layers and layers == list(range(0, 2 * len(layers), 2)) and len(state) == 2 * len(layers):
        return f"mlp{len(layers)}x_gelu"
    raise UnsupportedConversion(f"mm_projector weights {sorted(state)} are neither linear nor mlp<N>x_gelu")


def _sub(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _checked_kind(cfg: dict, projector: dict) -> str:
    kind = projector_kind(projector)
    if cfg.get("mm_projector_type", kind) != kind:
        raise UnsupportedConversion(f"config says mm_projector_type {cfg['mm_projector_type']!r} but the weights are {kind!r}")
    return kind


def build_llm(cfg: dict, state: dict[str, torch.Tensor], dtype: torch.dtype):
    """The LLM of a LLaVA checkpoint (its config fields minus LLaVA's), holding the checkpoint's weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = (cfg.get("architectures") or ["?"])[0]
    if arch not in ARCHITECTURES:
        raise UnsupportedConversion(f"architecture {arch!r} is not one of {', '.join(ARCHITECTURES)}")
    fields = {k: v for k, v in cfg.items() if k not in LLAVA_ONLY_KEYS and not k.startswith("mm_")}
    config = AutoConfig.for_model(ARCHITECTURES[arch], **fields)
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(config, dtype=dtype)
    llm_state = {k: v.to(dtype) for k, v in state.items() if not k.startswith(("model.mm_projector.", "model.vision_tower."))
                 and not k.endswith("rotary_emb.inv_freq")  # older checkpoints saved this (recomputed) buffer
                 and k != NEWLINE}
    missing, unexpected = llm.load_state_dict(llm_state, strict=False, assign=True)
    if config.tie_word_embeddings and missing == ["lm_head.weight"]:
        missing = []
    if missing or unexpected:
        raise UnsupportedConversion(f"LLM weights do not fit {arch}: missing {missing}, unexpected {unexpected}")
    llm.tie_weights()
    return llm


def import_official(model_dir: str | Path, out_dir: str | Path, vision_tower: str | None = None,
                    template: str = "vicuna_v1", dtype: str | None = None) -> Path:
    """A LLaVA-1.5 release directory -> our model directory."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    cfg = read_llava_config(model_dir)
    aspect, vision = image_aspect(cfg), vision_config(cfg, vision_tower)
    state = load_weights(model_dir)
    projector = _sub(state, PROJECTOR_PREFIX)
    kind = _checked_kind(cfg, projector)
    dtype = dtype or {"float16": "float16", "bfloat16": "bfloat16"}.get(cfg.get("torch_dtype"), "float32")
    llm = build_llm(cfg, state, DTYPES[dtype])
    tower = build_vision_tower(vision)
    if tower_state := _sub(state, TOWER_PREFIX):  # a tower trained with the LLM is in the checkpoint
        tower.model.load_state_dict(tower_state)
    model_cfg = ModelConfig(vision=vision, projector=kind, llm=LLMConfig(path=str(model_dir), dtype=dtype),
                            tokenizer=str(model_dir), image_aspect=aspect, template=template,
                            image_grid_pinpoints=cfg.get("image_grid_pinpoints") if aspect == "anyres" else None)
    model = LlavaModel(model_cfg, llm=llm, vision=tower)
    model.projector.load_state_dict(projector)
    if aspect == "anyres":
        if NEWLINE not in state:
            raise UnsupportedConversion(f"an anyres / spatial_unpad checkpoint without {NEWLINE}")
        with torch.no_grad():
            model.image_newline.copy_(state[NEWLINE].float())
    model.save_pretrained(out_dir, load_tokenizer(str(model_dir)), {"template": template, "imported_from": str(model_dir)})
    log.info("imported %s (%s, %s, %s tower) -> %s", model_dir, type(llm).__name__, kind, vision.model, out_dir)
    return out_dir


def import_pretrain_projector(path: str | Path, out_dir: str | Path, vision_tower: str | None = None) -> Path:
    """LLaVA-Pretrain `mm_projector.bin` (a file, or the run directory holding it) -> our Stage-1 output."""
    path, out_dir = Path(path), Path(out_dir)
    file = path / "mm_projector.bin" if path.is_dir() else path
    cfg = read_llava_config(file.parent) if (file.parent / "config.json").is_file() else {}
    projector = _sub(torch.load(file, map_location="cpu", weights_only=True), PROJECTOR_PREFIX)
    kind = _checked_kind(cfg, projector)
    model_cfg = ModelConfig(projector=kind, image_aspect=image_aspect(cfg), llm=LLMConfig(path=cfg.get("_name_or_path")))
    if cfg:
        model_cfg.vision = vision_config(cfg, vision_tower)
    weights = sorted((k for k in projector if k.endswith("weight")), key=lambda k: int(k.split(".")[0]) if "." in k[:-7] else 0)
    dims = {"vision_hidden": int(projector[weights[0]].shape[1]), "llm_hidden": int(projector[weights[-1]].shape[0])}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.float().contiguous() for k, v in projector.items()}, out_dir / PROJECTOR_FILE, metadata={"projector": kind})
    payload = {"format": "llava_sft/1", "model": asdict(model_cfg), "imported_from": str(file), "dims": dims}
    (out_dir / CONFIG_FILE).write_text(json.dumps(payload, indent=2))
    return out_dir
