"""DeepSpeed ZeRO-2/3 as the distributed engine (`train.deepspeed: PATH` to a JSON config).

What stays ours, whatever the JSON says:
* the optimizer (torch AdamW with our parameter groups; DeepSpeedCPUAdam only when the optimizer is
  offloaded on a CUDA machine) and the warmup + cosine schedule: a JSON with an "optimizer" or
  "scheduler" section is refused;
* the batch geometry and clipping: train_batch_size / train_micro_batch_size_per_gpu /
  gradient_accumulation_steps come from train.global_batch_size / train.micro_batch_size and the
  world size, gradient_clipping from train.grad_clip. In the JSON they may be absent or "auto";
  any other value that differs is an error;
* the loss normalisation: each micro-batch's summed token loss / the global supervised-token count,
  x world size (the engine averages over ranks), backward with scale_wrt_gas=False.

`bf16.enabled: "auto"` means train.bf16 on a CUDA device. On a CPU-only machine DeepSpeed needs
`DS_ACCELERATOR=cpu` (set here if unset and no CUDA device is visible; gloo backend).

ZeRO-3: the HF LLM is built under `HfDeepSpeedConfig` (from_pretrained loads partitioned); the
frozen vision tower is kept whole on every rank (its parameters become buffers, which ZeRO does not
partition), since it is frozen and open_clip reads some of its weights outside sub-module calls.
"""
from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
DS_TAG = "deepspeed"  # sub-directory of a periodic checkpoint holding the engine's files
FILLED = {  # DeepSpeed key -> where our config sets it
    "train_batch_size": "train.global_batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.global_batch_size / (world size x train.micro_batch_size)",
    "gradient_clipping": "train.grad_clip",
}


class DeepSpeedConfigError(ValueError):
    pass


def resolve_config(path: str | Path, t_cfg, world: int, cuda: bool, quantized: bool = False) -> dict:
    """The DeepSpeed JSON with our values filled in; a clear error for anything that contradicts them."""
    path = Path(path)
    if not path.is_file() and not path.is_absolute() and (REPO_ROOT / path).is_file():
        path = REPO_ROOT / path  # configs/deepspeed/... from any working directory
    if not path.is_file():
        raise FileNotFoundError(f"train.deepspeed: {path} not found")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DeepSpeedConfigError(f"train.deepspeed: {path} is not valid JSON: {e}") from e
    for section, ours in (("optimizer", "AdamW from train.lr / weight_decay / adam_betas / adam_eps"),
                          ("scheduler", "warmup + cosine from train.warmup_ratio / lr_schedule")):
        if section in cfg:
            raise DeepSpeedConfigError(
                f"train.deepspeed: {path} has an {section!r} section; remove it: the trainer owns the {section} "
                f"({ours}), and DeepSpeed's would silently replace it")
    if t_cfg.global_batch_size % (world * t_cfg.micro_batch_size):
        raise DeepSpeedConfigError(
            f"train.global_batch_size={t_cfg.global_batch_size} is not a multiple of world size {world} x "
            f"train.micro_batch_size={t_cfg.micro_batch_size}")
    ours = {"train_batch_size": t_cfg.global_batch_size, "train_micro_batch_size_per_gpu": t_cfg.micro_batch_size,
            "gradient_accumulation_steps": t_cfg.global_batch_size // (world * t_cfg.micro_batch_size),
            "gradient_clipping": float(t_cfg.grad_clip)}
    for key, value in ours.items():
        given = cfg.get(key, "auto")
        if given != "auto" and (isinstance(given, bool) or not isinstance(given, (int, float)) or given != value):
            raise DeepSpeedConfigError(
                f"train.deepspeed: {path} sets {key}={given!r} but the run config gives {value!r} ({FILLED[key]}); "
                f"set it to \"auto\" or remove it")
        cfg[key] = value
    if cfg.get("fp16", {}).get("enabled") not in (None, False, "auto"):
        raise DeepSpeedConfigError(f"train.deepspeed: {path} enables fp16; use bf16 (fp16 loss scaling is not supported here)")
    cfg.pop("fp16", None)
    bf16 = cfg.setdefault("bf16", {})
    if bf16.get("enabled", "auto") == "auto":
        bf16["enabled"] = bool(t_cfg.bf16 and cuda)
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    if stage not in (1, 2, 3):
        raise DeepSpeedConfigError(f"train.deepspeed: {path} has zero_optimization.stage={stage!r}; use 1, 2 or 3")
    if stage == 3 and quantized:
        raise DeepSpeedConfigError(
            f"train.deepspeed: {path} is ZeRO-3, which cannot partition a 4-bit (QLoRA) base here: use "
            "configs/deepspeed/zero2.json (as LLaVA's QLoRA script does) or train.deepspeed=null (DDP)")
    if optimizer_offloaded(cfg) and not cuda:
        cfg["zero_force_ds_cpu_optimizer"] = False  # torch AdamW on the CPU (DeepSpeedCPUAdam needs a build)
    cfg.setdefault("steps_per_print", 10**9)  # we log every step ourselves
    cfg.setdefault("wall_clock_breakdown", False)
    return cfg


def zero_stage(cfg: dict) -> int:
    return int(cfg["zero_optimization"]["stage"])


def optimizer_offloaded(cfg: dict) -> bool:
    return cfg.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") not in ("none", None)


def init_distributed(cuda: bool) -> None:
    """deepspeed.init_distributed from the torchrun environment (a lone process gets a 1-rank group)."""
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "WORLD_SIZE" not in os.environ:  # `python -m llava_sft.train` without torchrun
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(port))
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False)


class DeepSpeedRun:
    """One run's DeepSpeed state: the resolved config, the ZeRO-3 HF hook, the engine."""

    def __init__(self, config: dict):
        self.config = config
        self.stage = zero_stage(config)
        self.bf16 = bool(config["bf16"]["enabled"])
        self.engine = None
        self._hf_ds_config = None

    def before_model_build(self) -> None:
        """Under ZeRO-3, HF models built from now on are partitioned at load time (the object must stay alive)."""
        if self.stage == 3:
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_ds_config = HfDeepSpeedConfig(self.config)

    def initialize(self, model: nn.Module, groups: list[dict], t_cfg, lr_lambda):
        """(engine, optimizer, scheduler): our AdamW param groups and LambdaLR, handed to DeepSpeed."""
        import deepspeed

        if self.stage == 3:
            params_to_buffers(model.vision_tower)
            llm = list(model.llm.parameters())
            log.info("ZeRO-3: %d of %d LLM parameter tensors were loaded partitioned (HfDeepSpeedConfig / zero.Init); "
                     "the frozen vision tower is kept whole on every rank", sum(hasattr(p, "ds_id") for p in llm), len(llm))
        kwargs = dict(lr=t_cfg.lr, betas=tuple(t_cfg.adam_betas), eps=t_cfg.adam_eps)
        if optimizer_offloaded(self.config) and torch.cuda.is_available():
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
        else:
            optimizer = torch.optim.AdamW(groups, **kwargs)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=self.config)
        self.engine = engine
        log.info("DeepSpeed ZeRO-%d, bf16=%s, %s, gradient accumulation %d", self.stage, self.bf16,
                 type(optimizer).__name__, self.config["gradient_accumulation_steps"])
        return engine, optimizer, scheduler

    # ------------------------------------------------------------------ step
    def step(self) -> float:
        """Optimizer + schedule step at the accumulation boundary; returns the pre-clipping gradient norm."""
        with torch.no_grad():  # gloo's all-gather writes into views of the flat parameter buffers
            self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    # ------------------------------------------------------------ checkpoints
    def save(self, directory: Path) -> None:
        """Collective: every rank writes its shards into `directory/deepspeed`."""
        self.engine.save_checkpoint(str(directory), tag=DS_TAG, save_latest=False, exclude_frozen_parameters=True)

    def load(self, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(directory), tag=DS_TAG, load_module_strict=False,
                                              load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"{directory / DS_TAG}: no DeepSpeed checkpoint could be loaded")

    def full_state_dict(self, model: nn.Module, rank: int) -> dict | None:
        """Collective: the whole model's state dict (gathered under ZeRO-3) on rank 0's CPU, None elsewhere."""
        if self.stage < 3:
            return {k: v.detach().cpu() for k, v in model.state_dict().items()} if rank == 0 else None
        import deepspeed

        out: dict[str, torch.Tensor] = {}
        for prefix, module in model.named_modules():
            params = list(module.named_parameters(recurse=False))
            with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
                if rank == 0:
                    for name, p in params:
                        out[f"{prefix}.{name}" if prefix else name] = p.detach().cpu().clone()
        if rank != 0:
            return None
        for name, buf in model.state_dict().items():  # buffers (ZeRO does not partition them)
            if name not in out:
                out[name] = buf.detach().cpu().clone()
        return out


def params_to_buffers(module: nn.Module) -> None:
    """Turn a frozen module's parameters into (persistent) buffers of the same names: ZeRO leaves them whole."""
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is None:
                continue
            if p.requires_grad:
                raise ValueError(f"{type(sub).__name__}.{name} trains: only frozen modules can be kept whole")
            del sub._parameters[name]
            sub.register_buffer(name, p.data, persistent=True)
