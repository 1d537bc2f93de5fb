"""Hugging Face `CLIPVisionModel` (the tower of the official LLaVA releases, e.g. openai/clip-vit-large-patch14-336).

`model`: HF directory or hub id (a full CLIP or a vision-only config); `pretrained`: where the weights come
from (usually the same), None = random init from the config; `model_config_file`: a config.json to use instead.
"""
from __future__ import annotations

import torch

from llava_sft.model.vision import VisionConfig, VisionTower


class HFClipVisionTower(VisionTower):
    def __init__(self, cfg: VisionConfig):
        super().__init__(cfg)
        from transformers import CLIPVisionConfig, CLIPVisionModel

        config = CLIPVisionConfig.from_pretrained(cfg.model_config_file or cfg.model, **(cfg.model_kwargs or {}))
        self.model = CLIPVisionModel.from_pretrained(cfg.pretrained, config=config) if cfg.pretrained \
            else CLIPVisionModel(config)
        self.hidden_size, self.image_size = config.hidden_size, config.image_size
        self.num_patches = (config.image_size // config.patch_size) ** 2
        self.check_select_layer(config.num_hidden_layers)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.model(pixels.to(self.model.dtype), output_hidden_states=True)
        return self.select_hidden_state(out.hidden_states)
