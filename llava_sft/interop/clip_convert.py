"""open_clip CLIP ViT -> Hugging Face `CLIPVisionModel`: config and weights, exactly or not at all.

The mapping (per block i):
    conv1                         -> embeddings.patch_embedding        (both without bias)
    class_embedding               -> embeddings.class_embedding
    positional_embedding          -> embeddings.position_embedding     (learned or fixed sin-cos: values copied)
    ln_pre                        -> pre_layrnorm                      (sic, HF's spelling)
    transformer.resblocks.i.ln_1  -> encoder.layers.i.layer_norm1
    ...attn.in_proj_{weight,bias} -> encoder.layers.i.self_attn.{q,k,v}_proj  (split in three)
    ...attn.out_proj              -> encoder.layers.i.self_attn.out_proj
    ...ln_2                       -> encoder.layers.i.layer_norm2
    ...mlp.c_fc / mlp.c_proj      -> encoder.layers.i.mlp.fc1 / fc2
    ln_post                       -> post_layernorm
`proj` (the contrastive projection) has no place in `CLIPVisionModel` and is dropped: it never touches the
hidden states LLaVA reads. QuickGELU -> hidden_act "quick_gelu", nn.GELU -> "gelu" (both exact).

Anything else (layer scale, qk-norm, no ln_pre, attention pooling, other activations or norms...) has
no HF counterpart: `UnsupportedConversion` names it instead of writing a tower that computes something else.
"""
from __future__ import annotations

import re
from functools import lru_cache

import torch
from torch import nn


class UnsupportedConversion(ValueError):
    """The source cannot be expressed exactly in the target format."""


_BLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")
_BLOCK_MAP = {
    "ln_1.weight": "layer_norm1.weight", "ln_1.bias": "layer_norm1.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight", "attn.out_proj.bias": "self_attn.out_proj.bias",
    "ln_2.weight": "layer_norm2.weight", "ln_2.bias": "layer_norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight", "mlp.c_proj.bias": "mlp.fc2.bias",
}
_TOP_MAP = {
    "conv1.weight": "embeddings.patch_embedding.weight", "class_embedding": "embeddings.class_embedding",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_pre.weight": "pre_layrnorm.weight", "ln_pre.bias": "pre_layrnorm.bias",
    "ln_post.weight": "post_layernorm.weight", "ln_post.bias": "post_layernorm.bias",
}
_DROPPED = {"proj"}
_ACTIVATIONS = {"QuickGELU": "quick_gelu", "GELU": "gelu"}


def openclip_to_hf_clip_config(visual: nn.Module) -> dict:
    """`CLIPVisionConfig` kwargs for an open_clip `VisionTransformer` (raises `UnsupportedConversion`)."""
    if type(visual).__name__ != "VisionTransformer":
        raise UnsupportedConversion(f"only open_clip's own VisionTransformer converts to CLIPVisionModel, not "
                                    f"{type(visual).__name__} (e.g. a timm trunk)")
    blocks = visual.transformer.resblocks
    block = blocks[0]
    if type(block).__name__ != "ResidualAttentionBlock":
        raise UnsupportedConversion(f"open_clip block type {type(block).__name__} has no CLIPVisionModel counterpart")
    act = type(block.mlp.gelu).__name__
    if act not in _ACTIVATIONS or getattr(block.mlp.gelu, "approximate", "none") != "none":
        raise UnsupportedConversion(f"activation {block.mlp.gelu!r} has no exact CLIPVisionModel hidden_act")
    norms = [m for m in visual.modules() if isinstance(m, nn.LayerNorm)]
    if not isinstance(visual.ln_pre, nn.LayerNorm) or len({m.eps for m in norms}) != 1:
        raise UnsupportedConversion("CLIPVisionModel needs LayerNorms with one epsilon, including ln_pre")
    if visual.patch_size[0] != visual.patch_size[1] or visual.image_size[0] != visual.image_size[1]:
        raise UnsupportedConversion(f"CLIPVisionModel needs square images and patches, got image "
                                    f"{visual.image_size} patch {visual.patch_size}")
    width = visual.transformer.width
    return {
        "hidden_size": width, "intermediate_size": block.mlp.c_fc.out_features, "num_hidden_layers": len(blocks),
        "num_attention_heads": block.attn.num_heads, "num_channels": 3, "image_size": visual.image_size[0],
        "patch_size": visual.patch_size[0], "hidden_act": _ACTIVATIONS[act], "layer_norm_eps": norms[0].eps,
        "projection_dim": getattr(visual, "output_dim", width), "attention_dropout": 0.0,
    }


def openclip_to_hf_clip_state(visual: nn.Module) -> dict[str, torch.Tensor]:
    """`CLIPVisionModel` state dict holding the weights of an open_clip ViT (keys as the installed transformers
    names them: under `vision_model.` in 4.x, at the top level in 5.x)."""
    openclip_to_hf_clip_config(visual)  # refuses what cannot be expressed
    out: dict[str, torch.Tensor] = {}
    for key, value in visual.state_dict().items():
        value = value.detach()
        if key in _TOP_MAP:
            out[_TOP_MAP[key]] = value
            continue
        if key in _DROPPED:
            continue
        match = _BLOCK.match(key)
        if not match:
            raise UnsupportedConversion(f"open_clip weight {key!r} has no CLIPVisionModel counterpart")
        prefix, rest = f"encoder.layers.{match.group(1)}.", match.group(2)
        if rest in _BLOCK_MAP:
            out[prefix + _BLOCK_MAP[rest]] = value
        elif rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = rest.rsplit("_", 1)[1]
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0), strict=True):
                out[f"{prefix}self_attn.{name}.{kind}"] = part.clone()
        else:
            raise UnsupportedConversion(f"open_clip weight {key!r} has no CLIPVisionModel counterpart")
    prefix = _clip_vision_prefix()
    return {f"{prefix}{k}": v.contiguous() for k, v in out.items()}


@lru_cache(maxsize=1)
def _clip_vision_prefix() -> str:
    """transformers 5.x flattened CLIPVisionModel (its `vision_model` wrapper is gone): ask the installed class."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    with torch.device("meta"):
        model = CLIPVisionModel(CLIPVisionConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                                 num_attention_heads=1, image_size=4, patch_size=2))
    return "vision_model." if hasattr(model, "vision_model") else ""


def openclip_to_hf_clip(visual: nn.Module):
    """A `transformers.CLIPVisionModel` (fp32, eval) computing exactly what the open_clip ViT computes."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    model = CLIPVisionModel(CLIPVisionConfig(**openclip_to_hf_clip_config(visual)))
    missing, unexpected = model.load_state_dict(openclip_to_hf_clip_state(visual), strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise UnsupportedConversion(f"conversion incomplete: missing {missing}, unexpected {unexpected}")
    return model.eval()
