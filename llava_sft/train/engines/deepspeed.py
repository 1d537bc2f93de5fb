"""DeepSpeed ZeRO-2/3 as the distributed engine (`train.engine: deepspeed`, or simply `train.deepspeed: PATH` to
a JSON config).

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

import contextlib
import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from llava_sft.train.engines.base import Engine, params_to_buffers

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[3]
DS_TAG = "deepspeed"  # sub-directory of a periodic checkpoint holding the engine's files
FILLED = {  # DeepSpeed key -> where our config sets it
    "train_batch_size": "train.global_batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.global_batch_size / (world size x train.micro_batch_size)",
    "gradient_clipping": "train.grad_clip",
}


class DeepSpeedConfigError(ValueError):
    pass


def resolve_config(path: str | Path, train_cfg, world: int, cuda: bool, quantized: bool = False) -> dict:
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
    if train_cfg.global_batch_size % (world * train_cfg.micro_batch_size):
        raise DeepSpeedConfigError(
            f"train.global_batch_size={train_cfg.global_batch_size} is not a multiple of world size {world} x "
            f"train.micro_batch_size={train_cfg.micro_batch_size}")
    ours = {"train_batch_size": train_cfg.global_batch_size, "train_micro_batch_size_per_gpu": train_cfg.micro_batch_size,
            "gradient_accumulation_steps": train_cfg.global_batch_size // (world * train_cfg.micro_batch_size),
            "gradient_clipping": float(train_cfg.grad_clip)}
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
        bf16["enabled"] = bool(train_cfg.bf16 and cuda)
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
    Engine.lone_process_environment()
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False)


class DeepSpeedEngine(Engine):
    """One run's DeepSpeed state: the resolved config, the ZeRO-3 HF hook, the DeepSpeed engine (`self.module`).
    A periodic checkpoint holds the trainable names in state.pt and the engine's own files (fp32 masters, optimizer,
    schedule) in step_N/deepspeed/, written by every rank."""
    name = checkpoint_name = "deepspeed"
    keeps_fp32_masters = True  # ZeRO (every stage) keeps an fp32 partition of each trainable parameter
    equal_forward_passes = True  # ZeRO's collectives run in every micro-batch's forward (ZeRO-3) and backward

    def __init__(self, cfg, world: int, rank: int):
        super().__init__(cfg.train, world, rank)
        cuda = torch.cuda.is_available() and cfg.train.device in ("auto", "cuda")
        quantized = bool(cfg.model.lora and cfg.model.lora.quantize)
        # resolved before anything starts: a bad DeepSpeed JSON is a clear error now
        self.config = resolve_config(cfg.train.deepspeed, cfg.train, world, cuda, quantized)
        self.stage = zero_stage(self.config)
        if self.stage == 3 and cfg.train.train_vision_tower:
            raise DeepSpeedConfigError("train.train_vision_tower=true needs ZeRO-2 (configs/deepspeed/zero2.json) or "
                                       "train.engine=ddp: ZeRO-3 keeps the vision tower whole, as buffers, on every "
                                       "rank")
        self.bf16 = bool(self.config["bf16"]["enabled"])
        self.reentrant_checkpointing = self.stage == 3  # see train/build.py enable_gradient_checkpointing
        self._hf_ds_config = None

    def init_distributed(self, cuda: bool) -> None:
        init_distributed(cuda)

    def before_model_build(self) -> None:
        """Under ZeRO-3, HF models built from now on are partitioned at load time (the object must stay alive)."""
        if self.stage == 3:
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_ds_config = HfDeepSpeedConfig(self.config)

    def text_only_anchor(self) -> str:
        # ZeRO-3's module hooks issue collectives: every rank runs every module, a text-only batch a blank image
        return "modules" if self.stage == 3 else super().text_only_anchor()

    def autocast(self, device: torch.device) -> bool:
        return super().autocast(device) and not self.bf16  # DeepSpeed's bf16 mode: the weights are bf16 already

    def setup(self, model: nn.Module, make_groups, lr_lambda) -> None:
        """Our AdamW param groups and LambdaLR, handed to DeepSpeed."""
        import deepspeed

        self.model = model
        model.text_only_anchor = self.text_only_anchor()
        if self.stage == 3:
            params_to_buffers(model.vision_tower)
            llm = list(model.llm.parameters())
            log.info("ZeRO-3: %d of %d LLM parameter tensors were loaded partitioned (HfDeepSpeedConfig / zero.Init); "
                     "the frozen vision tower is kept whole on every rank", sum(hasattr(p, "ds_id") for p in llm), len(llm))
        train_cfg = self.train_cfg
        groups = make_groups(model)
        if optimizer_offloaded(self.config) and torch.cuda.is_available():
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(groups, adamw_mode=True, lr=train_cfg.lr, betas=tuple(train_cfg.adam_betas),
                                         eps=train_cfg.adam_eps)
        else:
            optimizer = self.adamw(groups)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
        self.module, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                    config=self.config)
        self.optimizer, self.scheduler = optimizer, scheduler
        log.info("DeepSpeed ZeRO-%d, bf16=%s, %s, gradient accumulation %d", self.stage, self.bf16,
                 type(optimizer).__name__, self.config["gradient_accumulation_steps"])

    def prepare_frozen(self, module):
        """ZeRO-3: an inference engine over the frozen model (its LLM was loaded partitioned), as TRL prepares its
        reference model (trl/models/utils.py prepare_deepspeed); ZeRO-1/2 partition only what trains: whole."""
        if self.stage != 3:
            return super().prepare_frozen(module)
        import deepspeed

        params_to_buffers(module.vision_tower)
        module.text_only_anchor = "modules"  # its projector's forward gathers shards: every rank runs it
        config = {k: v for k, v in self.config.items() if k not in ("optimizer", "scheduler")}
        # its projector (and image_newline) were built whole: partition them too (already partitioned ones are
        # skipped); without an optimizer deepspeed.initialize converts nothing ("no attribute 'ds_status'")
        deepspeed.zero.Init(module=module, config_dict_or_path=config)
        engine, _, _, _ = deepspeed.initialize(model=module, config=config)
        engine.eval()  # (DeepSpeedEngine.eval returns None)
        return engine

    # ------------------------------------------------------------------ steps
    def accumulating(self, last: bool):
        self.module.set_gradient_accumulation_boundary(last)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.module.backward(loss, scale_wrt_gas=False)  # the loop normalised already: no division by accumulation

    def step(self, check) -> float:
        """Clipping (gradient_clipping = train.grad_clip), optimizer and schedule at the accumulation boundary.
        DeepSpeed computes the global gradient norm inside its step, so the norm is checked after it."""
        with torch.no_grad():  # gloo's all-gather writes into views of the flat parameter buffers
            self.module.step()
        norm = self.module.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        check(norm, True)
        return norm

    # ------------------------------------------------------------ checkpoints
    def checkpoint_state(self, model) -> dict:
        return {"engine": self.checkpoint_name, "zero_stage": self.stage,
                "trainable_names": [n for n, p in model.named_parameters() if p.requires_grad]}

    def write_checkpoint(self, directory: Path) -> None:
        """Collective: every rank writes its shards into `directory/deepspeed`."""
        self.module.save_checkpoint(str(directory), tag=DS_TAG, save_latest=False, exclude_frozen_parameters=True)

    def restore(self, state: dict, directory: Path, model) -> None:
        self.check_resumable(state, directory, model)
        path, _ = self.module.load_checkpoint(str(directory), tag=DS_TAG, load_module_strict=False,
                                              load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"{directory / DS_TAG}: no DeepSpeed checkpoint could be loaded")

    def full_state_dict(self, model: nn.Module, rank: int) -> dict | None:
        """Collective under ZeRO-3: the whole model's state dict gathered on rank 0's CPU (None elsewhere); below
        ZeRO-3 the modules hold their whole weights already (None)."""
        if self.stage < 3:
            return None
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
