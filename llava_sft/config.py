"""Typed run configuration: YAML file + `key=value` overrides -> dataclasses, validated up front.

Unknown keys and values of the wrong type are a clear error naming the key before anything heavy
is loaded. `python -m llava_sft.train CONFIG.yaml train.lr=2e-5 data.max_length=1024`.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from llava_sft import registry


class ConfigError(ValueError):
    pass


@dataclass
class VisionConfig:
    """Which encoder, which weights, which features. Saved with every checkpoint."""

    name: str = "openclip"  # registry key (llava_sft/registry.py VISION_TOWERS)
    model: str = "ViT-L-14-336"  # architecture: open_clip / timm model name, or HF model directory / hub id
    pretrained: str | None = "openai"  # weights: open_clip tag, local file, HF directory / hub id; None = random init
    cache_dir: str | None = None  # open_clip download cache (pre-filled for offline clusters)
    model_config_file: str | None = None  # JSON architecture (open_clip model config, or HF config.json)
    model_kwargs: dict | None = None  # architecture overrides (timm create_model kwargs, HF config fields)
    quick_gelu: bool = True  # OpenAI CLIP was trained with QuickGELU; the features are wrong without it
    select_layer: int = -2  # hidden-state index as in HF (-1 = last block, -2 = penultimate block)
    select_feature: str = "patch"  # "patch" (CLS/prefix tokens dropped) or "cls_patch"


@dataclass
class LoraSettings:
    r: int = 128
    alpha: int = 256
    dropout: float = 0.05
    target_modules: list[str] | None = None  # None: every nn.Linear of the LLM except the output head
    quantize: str | None = None  # None (LoRA) or "nf4" (QLoRA: 4-bit NF4 base weights, double quantisation)

    def __post_init__(self):
        if self.quantize not in (None, "nf4"):
            raise ValueError(f"model.lora.quantize must be null or 'nf4', got {self.quantize!r}")
        if self.r <= 0:
            raise ValueError(f"model.lora.r must be positive, got {self.r}")


@dataclass
class LLMConfig:
    path: str | None = None  # local HF model directory (or hub id where a hub is reachable)
    config: dict | None = None  # or: build a randomly initialised model from this HF config dict
    attn_implementation: str = "sdpa"  # "sdpa" (CPU/GPU), "flash_attention_2" (GPU, optional extra), "eager"
    dtype: str = "float32"  # weights dtype at load time ("bfloat16" for large models under DeepSpeed)


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: str = "mlp2x_gelu"
    llm: LLMConfig = field(default_factory=LLMConfig)
    tokenizer: str | None = None  # tokenizer directory; defaults to llm.path
    tokenizer_use_fast: bool = False  # LLaVA uses the slow SentencePiece Llama tokenizer
    image_aspect: str = "pad"  # "pad" (LLaVA-1.5), "square" (LLaVA v1), "anyres" (LLaVA-1.6), "anyres_max_N" (OneVision)
    # AnyRes (data/anyres.py): the grid resolutions as [width, height] pixel pairs (multiples of the tower's input
    # size) or LLaVA-NeXT's "(1x1),...,(6x6)"; null = LLaVA-1.6's 1x2, 2x1, 2x2, 3x1, 1x3 tiles
    image_grid_pinpoints: list | str | None = None
    unpad_rounding: str = "reference"  # AnyRes unpad: "reference" truncates (LLaVA), "hf" rounds (transformers)
    template: str = "vicuna_v1"  # chat template used at inference
    system_prompt: str | None = None  # overrides the chat template's system prompt (training and inference)
    lora: LoraSettings | None = None  # LoRA / QLoRA adapters on the LLM (see model/lora.py); None = full weights


@dataclass
class DataConfig:
    path: str = ""  # LLaVA-format JSON (list of {"id", "image"?, "conversations"})
    image_folder: str = ""  # image paths in the JSON are relative to this folder
    # or: webdataset shards (data_prep.make_shards), a directory or its manifest.json, streamed (data/stream.py)
    shards: str | None = None
    shuffle_buffer: int = 1000  # shards: per-worker shuffle buffer (samples); 0 = stream order
    verify_shards: bool = True  # shards: check each shard's sha256 against the manifest when first opened
    template: str = "plain"  # chat template for training (plain for Stage 1, vicuna_v1 for Stage 2)
    # when the tokenizer carries its own chat_template: "error" stops the run (exit 2) if data.template renders a
    # probe conversation to other ids, "warn" logs it, "off" skips the check (data/template_check.py)
    template_check: str | bool = "error"  # YAML's `off` arrives as false (validate() maps it)
    max_length: int = 2048  # tokens after image expansion
    overlong: str = "truncate"  # "truncate" (text after the last image only) or "drop"; both counted
    bad_samples: str = "error"  # "error" (stop, naming the sample) or "skip" (counted in the run report)
    # images checked before training starts (data/catalog.py), in parallel: "header" (opened, header parsed: 0-byte,
    # non-image and decompression-bomb files), "decode" (every pixel: also truncated files), "stat" (exists), "off"
    check_images_at_start: str | bool = "header"
    # the start-up check is done by one process per node and cached for the other ranks and the next run, in
    # cache_dir ("" = $LLAVA_SFT_CACHE or ~/.cache/llava_sft); startup_cache=false checks in every process, every time
    startup_cache: bool = True
    cache_dir: str = ""
    # a turn whose text holds the template's markers or special tokens ('</s>', 'USER:'): "refuse" (a bad sample,
    # under bad_samples) or "keep" (trained as is, counted in the start-up log)
    control_strings: str = "refuse"
    # which tokens carry loss: "replies" (LLaVA: each assistant reply and its end-of-turn marker) or "all" (every
    # text token, the prompt and the user's turns too: the "no loss masking" ablation, scripts/demo_ablations.sh)
    loss_on: str = "replies"
    group_by_modality: bool = False  # LLaVA-1.5 group_by_modality_length batches
    group_by_length: bool = False  # HF Trainer's group_by_length: batches of similar length (data/sampler.py)
    num_workers: int = 2
    # keep each sample as first loaded (token ids, labels, image tensors) in memory and reuse it in later epochs: for
    # small datasets on few CPU cores, where re-tokenizing and re-decoding every epoch competes with the step (the
    # demo: 6,000 samples, ~170 MB, benchmarks/RESULTS.md). The cache lives in the main process: num_workers must be 0;
    # with several ranks each holds what it has loaded (as epochs reshuffle, up to the whole set per rank)
    cache_samples: bool = False
    # Padding-free packing (data/packing.py): each rank's share of a global batch is packed into rows of at most
    # pack_max_tokens tokens (after image expansion; None = max_length), train.micro_batch_size rows per forward
    # pass; attention never crosses a sample boundary and the loss is exactly that of the unpacked batch.
    packing: bool = False
    pack_max_tokens: int | None = None


@dataclass
class TrainConfig:
    train_projector: bool = True
    train_llm: bool = False
    pretrained_projector: str | None = None  # Stage-1 output directory (or projector.safetensors)
    output_dir: str = "checkpoints/run"
    save_full_model: bool = False  # Stage 2: full model directory; Stage 1: projector only
    epochs: float = 1.0
    max_steps: int | None = None  # stop after this many optimizer steps (default: epochs)
    global_batch_size: int = 256  # samples per optimizer step, over all ranks
    micro_batch_size: int = 16  # samples per forward pass per rank
    lr: float = 1e-3
    projector_lr: float | None = None  # the projector's own learning rate (LLaVA's mm_projector_lr); None = lr
    # Train the vision tower too (LLaVA-NeXT's unfreeze_mm_vision_tower), at its own learning rate
    # (mm_vision_tower_lr; None = lr). Off in every paper recipe: the tower stays frozen in both stages.
    train_vision_tower: bool = False
    vision_tower_lr: float | None = None
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    lr_schedule: str = "cosine"  # "cosine" or "constant" (both after linear warmup)
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # max grad norm; 0 disables
    # How a step's token losses are weighted (docs/training.md, "Loss normalisation"):
    #   "global_tokens": the summed token loss / the supervised tokens of the whole global batch (all micro-batches,
    #     all ranks): every supervised token weighs the same, whatever the split into micro-batches and ranks;
    #     the only choice with data.packing (which changes which samples share a forward pass);
    #   "micro_batch_mean": each micro-batch's token mean, averaged over accumulation steps and ranks -- what HF
    #     Trainer < 4.46 did, so LLaVA / LLaVA-1.5's runs (transformers 4.31 / 4.37): a token of a micro-batch with
    #     few supervised tokens weighs more.
    loss_normalization: str = "global_tokens"
    bf16: bool = True  # bf16 autocast on GPU (ignored on CPU)
    gradient_checkpointing: bool = False
    seed: int = 42
    device: str = "auto"  # "auto", "cpu", "cuda"
    # DeepSpeed JSON (configs/deepspeed/zero2.json, zero3.json, zero3_offload.json): ZeRO-2/3 as the distributed
    # engine, launched with torchrun like DDP; null = no DeepSpeed. See train/engines/deepspeed.py.
    deepspeed: str | None = None
    # the distributed engine (train/engines/): "ddp" (one process or DistributedDataParallel), "deepspeed" (ZeRO,
    # the JSON in train.deepspeed), "fsdp2" (torch fully_shard); "auto": deepspeed when train.deepspeed is set
    engine: str = "auto"
    fsdp_shard_size: int = 0  # fsdp2: shard within groups of this many ranks, replicate across them (HSDP); 0 = all
    compile: bool = False  # torch.compile each decoder layer (ddp, fsdp2)
    save_every: int = 0  # periodic checkpoint every N optimizer steps (0 = by steps never; see save_every_minutes)
    # and a periodic checkpoint whenever this many minutes passed since the last one (0 = off): a job killed
    # without warning loses at most this much; SIGTERM / SIGUSR1 (pre-emption notice) save at the next step
    save_every_minutes: float = 30.0
    # "auto": continue from the latest complete checkpoint in output_dir/checkpoints (if any);
    # "never": start from scratch (old checkpoints in output_dir are deleted); or a step_N directory.
    resume: str = "auto"
    keep_last: int = 2  # periodic checkpoints kept
    log_every: int = 1
    tensorboard: bool = False
    wandb_project: str | None = None
    # one device's peak FLOP/s for `mfu` / `hfu` per step (train/flops.py); None = the GPU's dense bf16 peak from
    # train/memory.py GPUS (A100, H100, H200), not logged on a CPU or an unknown GPU
    flops_per_second_peak: float | None = None
    # log `live_tensor_gb` per step: bytes of all live torch tensors (unique storages) just before the optimizer
    # step, max over ranks -- weights, gradients, optimizer states (from the 2nd step), buffers; on a CPU the
    # analogue of CUDA's memory_allocated (costs a gc walk, ~0.2 s per step: for memory benchmarks only)
    profile_memory: bool = False


@dataclass
class PreferenceConfig:
    """Stage 3, preference optimisation (DPO): the `dpo:` section; its presence makes the run a DPO run and
    data.path a preference set (data/preference.py). model/dpo.py states each loss and its source."""

    loss_type: str = "sigmoid"  # "sigmoid" (DPO, Rafailov et al. 2023) or "ipo" (Azar et al. 2023)
    beta: float = 0.1
    label_smoothing: float = 0.0  # cDPO (Mitchell 2023): the share of pairs assumed mislabelled; sigmoid only
    sft_weight: float = 0.0  # + sft_weight x the chosen reply's mean token NLL (RPO, Pang et al. 2024; model/dpo.py)
    # where the reference log-probs come from: "precomputed" (one eval pass of the starting model before step 1,
    # stored and reused: train/reference.py), "copy" (a frozen copy of the starting model), "adapters_off" (LoRA:
    # the base LLM with the adapters disabled)
    reference: str = "precomputed"
    reference_dir: str = ""  # precomputed: where the store goes; "" = beside the data file (<data.path>.reference/)


@dataclass
class RunConfig:
    run_name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dpo: PreferenceConfig | None = None  # Stage 3 (preference optimisation); None = SFT (Stage 1 / Stage 2)


# --------------------------------------------------------------------------- loading
ENV_VAR = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def expand_env(text: str, where: str = "config") -> str:
    """Expand ${VAR} and ${VAR:-default} in a config file (data and model paths come from env vars)."""

    def sub(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is None:
            raise ConfigError(f"{where}: environment variable {name} is not set (used as ${{{name}}})")
        return default

    return ENV_VAR.sub(sub, text)


def load_config(path: str | Path | None, overrides: list[str] = (), cls=RunConfig):
    raw = yaml.safe_load(expand_env(Path(path).read_text(), str(path))) if path else {}
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.lr=2e-5)")
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else None
    cfg = from_dict(cls, raw, where="")
    return validate(cfg) if cls is RunConfig else cfg


# --------------------------------------------------------------------------- values
# Checked when the config is loaded (and again when training starts), before anything heavy: a typo here used to
# surface minutes later, after a 7B model had loaded, or never (train.device=gpu trained on the CPU).
CHOICES = {
    "train.device": ("auto", "cpu", "cuda"),
    "train.engine": ("auto", "ddp", "deepspeed", "fsdp2"),
    "train.lr_schedule": ("cosine", "constant"),
    "train.loss_normalization": ("global_tokens", "micro_batch_mean"),
    "data.template_check": ("error", "warn", "off"),
    "data.overlong": ("truncate", "drop"),
    "data.bad_samples": ("error", "skip"),
    "data.control_strings": ("refuse", "keep"),
    "data.loss_on": ("replies", "all"),
    "data.check_images_at_start": ("header", "decode", "stat", "off"),
    "model.unpad_rounding": ("reference", "hf"),
    "model.llm.dtype": ("float32", "bfloat16", "float16"),
    "model.llm.attn_implementation": ("sdpa", "eager", "flash_attention_2"),
    "model.vision.select_feature": ("patch", "cls_patch"),
}
# key -> (lowest allowed, whether the lowest is excluded); None values mean "not set" where the type allows it
RANGES = {
    "train.global_batch_size": (1, False), "train.micro_batch_size": (1, False), "train.epochs": (0, True),
    "train.max_steps": (1, False), "train.lr": (0, True), "train.projector_lr": (0, True),
    "train.vision_tower_lr": (0, True),
    "train.warmup_ratio": (0, False), "train.grad_clip": (0, False), "train.weight_decay": (0, False),
    "train.save_every": (0, False), "train.save_every_minutes": (0, False), "train.keep_last": (1, False),
    "train.log_every": (1, False), "data.max_length": (2, False), "data.num_workers": (0, False),
    "data.shuffle_buffer": (0, False), "data.pack_max_tokens": (2, False), "train.fsdp_shard_size": (0, False),
}


def _get(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def validate(cfg: RunConfig) -> RunConfig:
    """Every enum-like value against its allowed values (registries included), every size against its range."""
    errors = []
    if isinstance(cfg.data.check_images_at_start, bool):  # YAML reads `off` as false; true is the default check
        cfg.data.check_images_at_start = "header" if cfg.data.check_images_at_start else "off"
    if isinstance(cfg.data.template_check, bool):
        cfg.data.template_check = "error" if cfg.data.template_check else "off"
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            close = difflib.get_close_matches(str(value).lower(), allowed, n=1)
            errors.append(f"{key}={value!r} is not one of {', '.join(allowed)}"
                          + (f" (did you mean {close[0]!r}?)" if close else ""))
    for key, (low, exclusive) in RANGES.items():
        value = _get(cfg, key)
        if value is not None and (value <= low if exclusive else value < low):
            errors.append(f"{key}={value!r} must be {'>' if exclusive else '>='} {low}")
    if not cfg.train.warmup_ratio < 1:
        errors.append(f"train.warmup_ratio={cfg.train.warmup_ratio!r} must be < 1")
    errors += _numeric_string_errors("model.llm.config", cfg.model.llm.config)
    errors += _numeric_string_errors("model.vision.model_kwargs", cfg.model.vision.model_kwargs)
    errors += _engine_errors(cfg.train, bool(cfg.model.lora and cfg.model.lora.quantize))
    errors += _data_errors(cfg.data)
    errors += _image_errors(cfg)
    if cfg.data.packing and cfg.train.loss_normalization == "micro_batch_mean":
        errors.append("train.loss_normalization=micro_batch_mean cannot go with data.packing=true: packing decides "
                      "which samples share a forward pass, so a per-micro-batch mean would weigh tokens by how they "
                      "were packed; use train.loss_normalization=global_tokens (packed == padded exactly) or "
                      "data.packing=false")
    errors += _registry_errors(cfg)
    errors += _preference_errors(cfg)
    if errors:
        raise ConfigError("invalid config values:\n  " + "\n  ".join(errors))
    return cfg


class MissingPathError(ConfigError):
    pass


def check_paths(cfg: RunConfig) -> None:
    """Every path the run reads, checked before anything heavy loads (one error listing all that are missing).
    model.llm.path / model.tokenizer may be hub ids: checked when they look like paths (/, ., ~)."""
    def local(value: str | None) -> bool:
        return bool(value) and (value[0] in "/.~" or Path(value).exists())

    wanted = []
    if cfg.data.shards:
        wanted.append(("data.shards", cfg.data.shards))
    elif cfg.data.path:
        wanted += [("data.path", cfg.data.path), ("data.image_folder", cfg.data.image_folder)]
    for key, value in (("train.pretrained_projector", cfg.train.pretrained_projector),
                       ("model.llm.path", cfg.model.llm.path), ("model.tokenizer", cfg.model.tokenizer),
                       ("model.vision.model_config_file", cfg.model.vision.model_config_file)):
        if key.startswith("train.") and value or local(value):
            wanted.append((key, value))
    missing = [f"{key}={value} does not exist" for key, value in wanted if not Path(value).expanduser().exists()]
    if missing:
        raise MissingPathError("; ".join(missing))


def _numeric_string_errors(key: str, value) -> list[str]:
    """Strings that read as numbers inside free-form architecture dicts. YAML 1.1 (PyYAML) reads `1e-6` -- no dot
    -- as the *string* '1e-6' (and json.dumps writes 1e-06 so); the dict goes to transformers / timm unchecked, and
    the run failed in its first forward pass with a TypeError far from the config (seen with rms_norm_eps)."""
    if isinstance(value, dict):
        return [e for k, v in value.items() for e in _numeric_string_errors(f"{key}.{k}", v)]
    if isinstance(value, list):
        return [e for i, v in enumerate(value) for e in _numeric_string_errors(f"{key}[{i}]", v)]
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return []
        if value.strip().lower() not in ("nan", "inf", "-inf", "infinity", "-infinity"):
            return [f"{key}={value!r} is a string that reads as a number: YAML reads 1e-6 (no dot) as a string; "
                    f"write it with a dot and a signed exponent ({number:.1e})"]
    return []


def _image_errors(cfg: RunConfig) -> list[str]:
    import re

    aspect = cfg.model.image_aspect
    if aspect not in ("pad", "square", "anyres") and not re.fullmatch(r"anyres_max_[1-9]\d*", str(aspect)):
        close = difflib.get_close_matches(str(aspect).lower(), ("pad", "square", "anyres", "anyres_max_9"), n=1)
        return [f"model.image_aspect={aspect!r} is not one of pad, square, anyres, anyres_max_N (N >= 1)"
                + (f" (did you mean {close[0]!r}?)" if close else "")]
    if not str(aspect).startswith("anyres"):
        return []
    errors = []
    if cfg.model.vision.select_feature != "patch":
        errors.append(f"model.image_aspect={aspect} needs model.vision.select_feature=patch: the tiles' features are "
                      f"stitched into one grid of patch tokens (LLaVA-NeXT drops CLS)")
    if cfg.data.shards:
        errors.append(f"model.image_aspect={aspect} does not read data.shards yet (each image's token count comes "
                      f"from its size, which the shard reader does not pass on): use data.path")
    return errors


def _data_errors(data: DataConfig) -> list[str]:
    """Combinations of data settings that cannot mean what they say."""
    errors = []
    if data.cache_samples and data.num_workers:
        errors.append(f"data.cache_samples=true needs data.num_workers=0, got {data.num_workers}: loader workers "
                      f"start afresh each epoch, so a cache filled inside them would be thrown away")
    if data.cache_samples and data.shards:
        errors.append("data.cache_samples=true is for a JSON dataset (data.path): shards are streamed once per "
                      "epoch, not indexed")
    return errors


def _engine_errors(train: TrainConfig, quantized: bool) -> list[str]:
    """Combinations of engine settings that cannot mean what they say."""
    errors = []
    if train.engine == "deepspeed" and not train.deepspeed:
        errors.append("train.engine=deepspeed needs train.deepspeed (a JSON, e.g. configs/deepspeed/zero3.json)")
    if train.engine in ("ddp", "fsdp2") and train.deepspeed:
        errors.append(f"train.engine={train.engine} but train.deepspeed={train.deepspeed!r} is set: remove one "
                      f"(train.deepspeed=null, or train.engine=deepspeed)")
    if train.engine == "fsdp2" and quantized:
        errors.append("train.engine=fsdp2 cannot shard QLoRA's 4-bit weights: use train.engine=ddp or "
                      "train.deepspeed=configs/deepspeed/zero2.json")
    if train.fsdp_shard_size and train.engine != "fsdp2":
        errors.append(f"train.fsdp_shard_size={train.fsdp_shard_size} applies to train.engine=fsdp2 only")
    if train.train_vision_tower and train.engine == "fsdp2":
        errors.append("train.train_vision_tower=true needs train.engine=ddp or DeepSpeed ZeRO-2: FSDP2 keeps the "
                      "vision tower whole, as buffers, on every rank")
    if train.train_vision_tower and not train.save_full_model:
        errors.append("train.train_vision_tower=true needs train.save_full_model=true: a projector-only output "
                      "would drop the trained tower")
    if train.vision_tower_lr is not None and not train.train_vision_tower:
        errors.append(f"train.vision_tower_lr={train.vision_tower_lr} is set but train.train_vision_tower=false: "
                      f"the tower is frozen (set train.train_vision_tower=true, or remove the LR)")
    if train.compile and (train.engine == "deepspeed" or train.engine == "auto" and train.deepspeed):
        errors.append("train.compile=true is for train.engine=ddp or fsdp2 (DeepSpeed's hooks and torch.compile "
                      "are not tested together here)")
    return errors


def _registry_errors(cfg: RunConfig) -> list[str]:
    """Names that registries define: templates, vision towers, projectors."""
    from llava_sft.data.templates import list_templates  # torch-free, as llava_sft.registry

    errors = []
    for key in ("data.template", "model.template"):
        if _get(cfg, key) not in list_templates() + ["auto"]:
            errors.append(f"{key}={_get(cfg, key)!r} is not a chat template: {', '.join(list_templates())}, or auto "
                          f"(the tokenizer's own)")
    if cfg.model.vision.name not in registry.vision_tower_names():
        errors.append(f"model.vision.name={cfg.model.vision.name!r} is not a registered vision tower: "
                      f"{', '.join(registry.vision_tower_names())}")
    if not registry.is_projector(cfg.model.projector):
        errors.append(f"model.projector={cfg.model.projector!r} is not a projector: "
                      f"{', '.join(registry.projector_names())} or mlp<N>x_gelu")
    return errors


def _preference_errors(cfg: RunConfig) -> list[str]:
    """Stage 3 (`dpo:`): its values, and what the chosen reference needs."""
    dpo, errors = cfg.dpo, []
    if dpo is None:
        return errors
    if dpo.loss_type not in ("sigmoid", "ipo"):
        errors.append(f"dpo.loss_type={dpo.loss_type!r} is not one of sigmoid, ipo")
    if dpo.reference not in ("precomputed", "copy", "adapters_off"):
        errors.append(f"dpo.reference={dpo.reference!r} is not one of precomputed, copy, adapters_off")
    if not dpo.beta > 0:
        errors.append(f"dpo.beta={dpo.beta!r} must be > 0")
    if not 0 <= dpo.label_smoothing < 0.5:
        errors.append(f"dpo.label_smoothing={dpo.label_smoothing!r} must be in [0, 0.5)")
    if dpo.label_smoothing and dpo.loss_type != "sigmoid":
        errors.append("dpo.label_smoothing (cDPO) is defined for dpo.loss_type=sigmoid only")
    if dpo.sft_weight < 0:
        errors.append(f"dpo.sft_weight={dpo.sft_weight!r} must be >= 0")
    if cfg.data.template == "plain" or cfg.data.loss_on != "replies":
        errors.append("a DPO run scores the last assistant reply: data.template must be a chat template (not plain) "
                      "and data.loss_on=replies")
    if cfg.data.shards:
        errors.append("dpo: preference data is read from data.path (a JSON / JSONL of pairs), not data.shards")
    if dpo.reference == "adapters_off":
        if cfg.model.lora is None:
            errors.append("dpo.reference=adapters_off needs LoRA (model.lora): the reference is the base LLM with "
                          "the adapters disabled")
        if cfg.train.train_projector or cfg.train.train_vision_tower:
            errors.append("dpo.reference=adapters_off: set train.train_projector=false and "
                          "train.train_vision_tower=false -- disabling the adapters gives the starting model only "
                          "if nothing else trains (a trained projector would move the reference too)")
    if dpo.reference == "copy" and not cfg.model.llm.path and (cfg.train.engine == "fsdp2" or cfg.train.deepspeed):
        errors.append("dpo.reference=copy under DeepSpeed / FSDP2 loads the starting LLM a second time, sharded: set "
                      "model.llm.path (an LLM built from model.llm.config has no weights to load again)")
    return errors


def from_dict(cls, data: dict, where: str = ""):
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {(where + '.' if where else '') + close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown config key {path!r}{hint}; valid keys here: {', '.join(names)}")
        kwargs[key] = _coerce(hints[key], value, path)
    return cls(**kwargs)


def _coerce(tp, value, path):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{path}: invalid value {value!r}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value or {}, where=path)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "2e-5" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise ConfigError(f"{path}: expected {tp.__name__}, got {value!r} ({type(value).__name__})")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
