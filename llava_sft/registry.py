"""The names a config may use for a vision tower or a projector, without importing torch: the config is validated
when it loads (llava_sft/config.py), before anything heavy, and a YAML must parse in a fraction of a second.

The builders live beside their code (model/vision.py, model/projector.py); these are their names. A vision tower
is a "module:Class" string imported on first use, so an encoder's dependencies load only when it is used; an
encoder or a projector registered from a user's own module (`register_vision_tower`, `register_projector`) adds its
name here when that module is imported.
"""
from __future__ import annotations

import re

# registry key -> "module:Class"
VISION_TOWERS: dict[str, str] = {
    "openclip": "llava_sft.model.encoders.openclip:OpenClipVisionTower",  # CLIP ViT-L/14(-336), default
    "openclip_siglip": "llava_sft.model.encoders.openclip_siglip:OpenClipSiglipVisionTower",
    "hf_clip": "llava_sft.model.encoders.hf_clip:HFClipVisionTower",
    "hf_siglip": "llava_sft.model.encoders.hf_siglip:HFSiglipVisionTower",
    "timm": "llava_sft.model.encoders.timm_vit:TimmViTVisionTower",  # e.g. DINOv2
}
REGISTERED_TOWERS: set[str] = set()  # added by model.vision.register_vision_tower

PROJECTOR_NAMES: set[str] = {"linear", "identity"}  # model/projector.py registers their builders under these names
MLP_PROJECTOR = re.compile(r"^mlp(\d+)x_gelu$")  # the family mlp{N}x_gelu, N >= 1


def vision_tower_names() -> list[str]:
    return sorted(set(VISION_TOWERS) | REGISTERED_TOWERS)


def projector_names() -> list[str]:
    return sorted(PROJECTOR_NAMES)


def is_projector(name: str) -> bool:
    match = MLP_PROJECTOR.match(name)
    return name in PROJECTOR_NAMES or bool(match and int(match.group(1)) >= 1)
