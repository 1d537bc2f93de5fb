"""LoRA / QLoRA on the LLM (peft), as the LLaVA-1.5 LoRA recipe: adapters on every linear layer of
the LLM only (never the vision tower, the projector or lm_head); the projector trains fully.

    model.lora: {r: 128, alpha: 256, dropout: 0.05}                 # LoRA
    model.lora: {r: 128, alpha: 256, dropout: 0.05, quantize: nf4}  # QLoRA: 4-bit NF4 base, double quant

QLoRA's 4-bit layers compute (dequantise and multiply) in the LLM's dtype, `model.llm.dtype`, as LLaVA's train.py
sets bnb_4bit_compute_dtype from --bf16: bfloat16 (the QLoRA recipe) computes in bf16, float32 in fp32.

A LoRA run's model directory keeps the adapter (`llm/adapter_model.safetensors` +
`adapter_config.json`) and names its base LLM (`model.llm.path` in `llava_config.json`);
`python -m llava_sft.merge_lora` folds the adapter into a plain model directory that loads without peft.
"""
from __future__ import annotations

import contextlib
import logging
import sys

import torch
from torch import nn

from llava_sft.config import LoraSettings  # noqa: F401  (the schema lives in the torch-free config)

log = logging.getLogger(__name__)


def quantization_config(settings: LoraSettings | None, compute_dtype: torch.dtype):
    """The bitsandbytes config for a QLoRA base model (None for plain LoRA / full fine-tuning); `compute_dtype` is
    the LLM's dtype (model.llm.dtype)."""
    if settings is None or settings.quantize is None:
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise ImportError("QLoRA (model.lora.quantize=nf4) needs bitsandbytes: pip install bitsandbytes") from e
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def _import_peft() -> None:
    """peft 0.21 (the latest stack) imports bitsandbytes on `import peft` (peft/helpers.py), and bitsandbytes then
    logs "Failed to load CPU gemm_4bit_forward from kernels-community ..." on CPUs with AVX512-BF16, in runs that
    quantize nothing: that line is held back while peft is imported. A QLoRA run imports bitsandbytes itself first
    (quantization_config), with its warnings."""
    if "peft" in sys.modules:
        return
    bnb_log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = bnb_log.level
    bnb_log.setLevel(logging.ERROR)
    try:
        import peft  # noqa: F401
    finally:
        bnb_log.setLevel(level)


def attach_lora(llm: nn.Module, settings: LoraSettings, gradient_checkpointing: bool = False) -> nn.Module:
    """Wrap the LLM with fresh LoRA adapters (base weights frozen)."""
    _import_peft()
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if getattr(llm, "is_loaded_in_4bit", False):
        llm = prepare_model_for_kbit_training(llm, use_gradient_checkpointing=gradient_checkpointing)
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=settings.target_modules or "all-linear", bias="none", task_type="CAUSAL_LM")
    with _bitsandbytes_only_if_quantized(llm):
        llm = get_peft_model(llm, config)
    trainable = sum(p.numel() for p in llm.parameters() if p.requires_grad)
    log.info("LoRA r=%d alpha=%d dropout=%.2f on %s: %s adapter parameters%s", settings.r, settings.alpha,
             settings.dropout, settings.target_modules or "every linear layer of the LLM", f"{trainable:,}",
             " (4-bit NF4 base)" if settings.quantize else "")
    return llm


@contextlib.contextmanager
def _bitsandbytes_only_if_quantized(llm: nn.Module):
    """peft checks every adapted layer against bitsandbytes' classes whenever bitsandbytes is installed, importing it
    -- which prints kernel / GPU warnings ("Failed to load CPU gemm_4bit_forward ...") in a run that quantizes
    nothing. A model that was not loaded in 4 or 8 bits has no bitsandbytes layer, so the check is switched off while
    the adapters are attached (peft 0.17: peft.tuners.lora.model's availability flags; absent names are left)."""
    if getattr(llm, "is_loaded_in_4bit", False) or getattr(llm, "is_loaded_in_8bit", False):
        yield
        return
    import peft.tuners.lora.model as lora_model

    saved = {n: getattr(lora_model, n) for n in ("is_bnb_available", "is_bnb_4bit_available") if hasattr(lora_model, n)}
    for name in saved:
        setattr(lora_model, name, lambda: False)
    try:
        yield
    finally:
        for name, flag in saved.items():
            setattr(lora_model, name, flag)


def load_lora(llm: nn.Module, adapter_dir: str) -> nn.Module:
    _import_peft()
    from peft import PeftModel

    with _bitsandbytes_only_if_quantized(llm):
        return PeftModel.from_pretrained(llm, adapter_dir)


def is_lora(llm: nn.Module) -> bool:
    return hasattr(llm, "peft_config")


def is_adapter_param(name: str) -> bool:
    return "lora_" in name
