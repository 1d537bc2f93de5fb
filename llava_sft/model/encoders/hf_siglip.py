"""Hugging Face `SiglipVisionModel` (e.g. google/siglip-so400m-patch14-384): no CLS token, mean/std 0.5.

`model`: HF directory or hub id; `pretrained`: where the weights come from, None = random init from the config
(`model_config_file`: a config.json to use instead).
"""
from __future__ import annotations

import torch

from llava_sft.model.vision import VisionConfig, VisionTower


class HFSiglipVisionTower(VisionTower):
    num_prefix_tokens = 0                       # no CLS: "patch" keeps every token
    image_mean = image_std = (0.5, 0.5, 0.5)    # what SigLIP was trained with

    def __init__(self, cfg: VisionConfig):
        super().__init__(cfg)
        from transformers import SiglipVisionConfig, SiglipVisionModel

        config = SiglipVisionConfig.from_pretrained(cfg.model_config_file or cfg.model, **(cfg.model_kwargs or {}))
        self.model = SiglipVisionModel.from_pretrained(cfg.pretrained, config=config) if cfg.pretrained \
            else SiglipVisionModel(config)
        self.hidden_size, self.image_size = config.hidden_size, config.image_size
        self.num_patches = (config.image_size // config.patch_size) ** 2
        self.check_select_layer(config.num_hidden_layers)   # clear error for an out-of-range select_layer

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.model(pixels.to(self.model.dtype), output_hidden_states=True)
        return self.select_hidden_state(out.hidden_states)  # hidden_states[select_layer], prefix tokens dropped
