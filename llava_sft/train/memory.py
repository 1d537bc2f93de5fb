"""Memory and time arithmetic for a run at its real shapes: what preflight projects and benchmarks/scale.py checks.

Model states (Rajbhandari et al. 2020, "ZeRO", section 3): frozen weights at their dtype (NF4: 0.5 byte + the
double-quantised scales), and per trainable parameter weights + gradients + AdamW's two moments (fp32: 4 + 4 + 8
bytes, + 4 for DeepSpeed's fp32 partition copy; bf16 mixed precision: 2 + 2 + 4 master + 8), partitioned as each
ZeRO stage does: ZeRO-2 the optimizer states and gradients, ZeRO-3 the weights too; the frozen vision tower is
whole on every rank. Not counted: DeepSpeed's communication buckets and ZeRO-3's persistent small parameters
(measured at ~0.1-0.2 GB on the benchmark shape, benchmarks/RESULTS.md).

Activations of a Llama decoder layer with flash attention (no s^2 term): 34 bytes x tokens x hidden in 16-bit
(Korthikanti et al. 2022, table 2); with gradient checkpointing each layer keeps only its 2-byte input, plus one
layer's activations during its recompute. The logits exist only at supervised positions (model/loss.py): 16-bit
logits and their gradient (4 bytes per supervised token x vocabulary) plus one chunk of fp32 log-probabilities and
its gradient (8 bytes x CHUNK_ROWS x vocabulary); computed at every position (a model with a logit transform) they
were ~10 bytes per token x vocabulary.

FLOPs per token (Kaplan et al. 2020 / PaLM appendix B): forward 2N, backward 4N when the weights train (2N for the
activation gradients when they are frozen), attention 12 x layers x hidden x seq per token for forward + backward;
gradient checkpointing recomputes the forward once more (counted in HFU, not in MFU).
"""
from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30
LOSS_CHUNK_ROWS = 2048  # model/loss.py CHUNK_ROWS (not imported: this module stays free of torch)


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gib: float  # what the framework can allocate (the card's memory)
    bf16_flops: float  # dense bf16 peak, FLOP/s


# The cards a LLaVA-1.5 run is sized for (vendor datasheets: dense bf16 tensor-core peak, no sparsity).
GPUS = {g.name: g for g in (
    Gpu("A100-40GB", 40, 312e12),
    Gpu("A100-80GB", 80, 312e12),
    Gpu("H100-80GB", 80, 989e12),
    Gpu("H200", 141, 989e12),
)}


def llm_shape(config: dict) -> dict:
    """The fields of an HF decoder config that the arithmetic needs (Llama-style names; GQA aware)."""
    heads = config["num_attention_heads"]
    return {"hidden_size": config["hidden_size"], "intermediate_size": config["intermediate_size"],
            "num_hidden_layers": config["num_hidden_layers"], "num_attention_heads": heads,
            "num_key_value_heads": config.get("num_key_value_heads") or heads, "vocab_size": config["vocab_size"],
            "tie_word_embeddings": bool(config.get("tie_word_embeddings", False))}


def _kv_width(llm: dict) -> int:
    heads = llm.get("num_attention_heads") or 1
    return llm["hidden_size"] * (llm.get("num_key_value_heads") or heads) // heads


def linear_weights(llm: dict) -> int:
    """Weights of the decoder layers' linear maps (q, k, v, o, gate, up, down): what NF4 quantises and LoRA adapts."""
    h, f, n, kv = llm["hidden_size"], llm["intermediate_size"], llm["num_hidden_layers"], _kv_width(llm)
    return n * (2 * h * h + 2 * h * kv + 3 * h * f)


def llm_params(llm: dict) -> int:
    h, n, v = llm["hidden_size"], llm["num_hidden_layers"], llm["vocab_size"]
    embeddings = v * h * (1 if llm.get("tie_word_embeddings") else 2)
    return embeddings + linear_weights(llm) + n * 2 * h + h  # + the two RMSNorms per layer and the final one


def lora_params(llm: dict, r: int) -> int:
    """A (r x in) + B (out x r) on every linear map of every decoder layer."""
    h, f, n, kv = llm["hidden_size"], llm["intermediate_size"], llm["num_hidden_layers"], _kv_width(llm)
    return n * r * (2 * (h + h) + 2 * (h + kv) + 3 * (h + f))


def vit_params(width: int, layers: int, patch: int, image: int, embed_dim: int = 0) -> int:
    """An open_clip / OpenAI CLIP ViT image tower: patch conv, CLS + positions, pre/post norms, blocks (attention
    3W^2+3W + W^2+W, MLP 8W^2+5W, two norms 4W), output projection."""
    grid = image // patch
    return 3 * patch * patch * width + (grid * grid + 2) * width + 4 * width + layers * (12 * width * width + 13 * width) \
        + width * embed_dim


def predicted_states_gb(method: str, engine: str, nproc: int, llm: dict, vision_params: int, projector_params: int,
                        lora_r: int, bf16: bool, vision_trains: bool = False) -> float:
    """Per-rank GiB of weights + gradients + optimizer states (no activations, no runtime).
    method: full | lora | qlora | projector (Stage 1: the LLM frozen); engine: ddp | zero2 | zero3 | fsdp2.
    `vision_trains` (train.train_vision_tower): the tower's weights get gradients and AdamW states like the
    LLM's (all of them counted: the few after the selected layer that stay frozen are < 5 % of a ViT-L)."""
    w = g = 2 if bf16 else 4  # bytes per weight / gradient
    # optimizer bytes per trainable parameter: AdamW's two fp32 moments, plus an fp32 master copy under bf16 and
    # under ZeRO (DeepSpeed keeps its own fp32 partition even of fp32 weights); DDP's gradients are views of its
    # all-reduce buckets (gradient_as_bucket_view), no second copy
    o = 8 + (4 if bf16 or engine != "ddp" else 0)
    total = llm_params(llm)
    if method == "full":
        frozen, trainable = 0.0, total + projector_params
    elif method == "projector":
        frozen, trainable = total * w, projector_params
    elif method == "lora":
        frozen, trainable = total * w, lora_params(llm, lora_r) + projector_params
    elif method == "qlora":  # NF4 linear weights (0.5 B + 8-bit absmax per 64 + fp32 scale per 256 blocks)
        lin = linear_weights(llm)
        frozen = lin * (0.5 + 1 / 64 + 4 / (64 * 256)) + (total - lin) * w
        trainable = lora_params(llm, lora_r) + projector_params
    else:
        raise ValueError(f"unknown method {method!r}")
    vision = vision_params * w  # the frozen vision tower is whole on every rank (also under ZeRO-3)
    if vision_trains:
        vision, trainable = 0.0, trainable + vision_params
    n = nproc
    if engine == "ddp":
        states = vision + frozen + trainable * (w + g + o)
    elif engine == "zero2":  # weights replicated; gradients + optimizer states partitioned
        states = vision + frozen + trainable * (w + (g + o) / n)
    elif engine == "zero3":  # weights too (the frozen ones as well)
        states = vision + (frozen + trainable * (w + g + o)) / n
    elif engine == "fsdp2":  # every LLM / projector weight upcast to fp32 and sharded, with its fp32 gradient and
        if method == "qlora":  # AdamW's moments (engines/fsdp2.py): 4 bytes per frozen, 16 per trainable parameter
            raise ValueError("FSDP2 does not shard a 4-bit base (QLoRA)")
        states = vision + (frozen * 4 / w + trainable * 16) / n
    else:
        raise ValueError(f"unknown engine {engine!r}")
    return states / GIB


def tower_activations_gb(width: int, layers: int, tokens: int, images: int) -> float:
    """A trained ViT's saved activations for `images` tower passes of `tokens` tokens: Korthikanti et al. (2022)'s
    34 * s * h bytes per layer in 16-bit, without the s^2 attention term (open_clip's towers use SDPA, whose
    memory-efficient kernels keep no score matrix); no checkpointing inside the tower."""
    return 34 * tokens * width * layers * images / GIB


def predicted_activations_gb(llm: dict, micro: int, seq: int, checkpointing: bool, bf16: bool,
                             supervised: int | None = None) -> float:
    """Per-rank activations of one micro-batch (see the module docstring), logits included; `supervised`: labelled
    tokens per sample (None: every token, the upper bound)."""
    h, n, v = llm["hidden_size"], llm["num_hidden_layers"], llm["vocab_size"]
    tokens = micro * seq
    rows = micro * (seq if supervised is None else min(supervised, seq))
    scale = 1 if bf16 else 2  # fp32 activations are twice the 16-bit ones
    layers = (34 * tokens * h + n * 2 * tokens * h) if checkpointing else n * 34 * tokens * h
    logits = (4 * rows + 8 * min(rows, LOSS_CHUNK_ROWS)) * v
    return (layers * scale + logits) / GIB


def flops_per_token(llm: dict, seq: int, weight_grads: bool, vision_params: int = 0, image_tokens_share: float = 0.0,
                    recompute: bool = False) -> float:
    """Training FLOPs per sequence token (see the module docstring); `weight_grads`: the LLM's weights get
    gradients (full fine-tuning; not Stage 1's frozen LLM, nor LoRA's frozen base). `image_tokens_share`: the fraction of sequence
    tokens that are image tokens; the vision tower runs forward once per image patch token."""
    n_params = llm_params(llm)
    dense = (6 if weight_grads else 4) * n_params
    attention = 12 * llm["num_hidden_layers"] * llm["hidden_size"] * seq
    recomputed = (2 * n_params + 4 * llm["num_hidden_layers"] * llm["hidden_size"] * seq) if recompute else 0
    return dense + attention + recomputed + 2 * vision_params * image_tokens_share


def hours(total_flops: float, gpus: int, gpu: Gpu, mfu: float) -> float:
    return total_flops / (gpus * gpu.bf16_flops * mfu) / 3600


def fits(peak_gib: float, gpu: Gpu, headroom: float = 0.9) -> bool:
    """The allocator, CUDA context and fragmentation take the rest: plan for 90 % of the card."""
    return peak_gib <= gpu.memory_gib * headroom
