"""open_clip ViT -> HF CLIPVisionModel: the converted tower gives the same select_layer patch features."""
from __future__ import annotations

import json

import pytest
import torch

from llava_sft.interop.clip_convert import UnsupportedConversion, openclip_to_hf_clip, openclip_to_hf_clip_config
from llava_sft.model.vision import VisionConfig, build_vision_tower
from tests.tiny import TEST_VIT


def tower(arch_file, name, quick_gelu=True, **vision):
    torch.manual_seed(0)
    return build_vision_tower(VisionConfig(model=name, pretrained=None, model_config_file=str(arch_file),
                                           quick_gelu=quick_gelu, **vision))


def write_arch(tmp_path, name, **vision_cfg):
    arch = json.loads(open(TEST_VIT).read())
    arch["vision_cfg"].update(vision_cfg)
    arch["quick_gelu"] = False  # the activation is then chosen by VisionConfig.quick_gelu (force_quick_gelu)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(arch))
    return path


@pytest.mark.parametrize("quick_gelu", [True, False], ids=["quick_gelu", "gelu"])
@pytest.mark.parametrize("select_layer", [-2, -1, 1, 2])
@pytest.mark.parametrize("select_feature", ["patch", "cls_patch"])
def test_hf_clip_gives_the_open_clip_select_layer_features(tmp_path, quick_gelu, select_layer, select_feature):
    arch = write_arch(tmp_path, f"conv-vit-{quick_gelu}")
    ours = tower(arch, arch.stem, quick_gelu, select_layer=select_layer, select_feature=select_feature)
    hf = openclip_to_hf_clip(ours.visual)
    assert hf.config.hidden_act == ("quick_gelu" if quick_gelu else "gelu")
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        hidden = hf(pixel_values=pixels, output_hidden_states=True).hidden_states
    # LLaVA's (and HF LlavaForConditionalGeneration's) reading of a CLIP tower: hidden_states[layer], CLS dropped
    expected = hidden[select_layer] if select_feature == "cls_patch" else hidden[select_layer][:, 1:]
    got = ours(pixels)
    assert got.shape == expected.shape == (3, ours.num_tokens, 48)
    assert torch.allclose(got, expected, atol=2e-6, rtol=1e-5)
    # and not trivially: another layer's features differ
    other = hidden[select_layer - 1 if select_layer < 0 else select_layer + 1]
    assert not torch.allclose(got, other if select_feature == "cls_patch" else other[:, 1:], atol=1e-3)


def test_fixed_sin_cos_position_embeddings_convert_too(tmp_path):
    arch = write_arch(tmp_path, "conv-vit-sincos", pos_embed_type="sin_cos_2d")
    ours = tower(arch, arch.stem)
    hf = openclip_to_hf_clip(ours.visual)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ours(pixels), hf(pixels, output_hidden_states=True).hidden_states[-2][:, 1:], atol=2e-6)


def test_vit_l_14_336_maps_to_the_openai_hf_config():
    """The architecture of LLaVA-1.5's tower gives the config of openai/clip-vit-large-patch14-336."""
    import open_clip

    with torch.device("meta"):
        visual = open_clip.create_model("ViT-L-14-336", force_quick_gelu=True, device="meta").visual
    cfg = openclip_to_hf_clip_config(visual)
    assert cfg == {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                   "num_channels": 3, "image_size": 336, "patch_size": 14, "hidden_act": "quick_gelu",
                   "layer_norm_eps": 1e-5, "projection_dim": 768, "attention_dropout": 0.0}


@pytest.mark.parametrize("vision_cfg, words", [
    ({"ls_init_value": 0.1}, "ls_1"),  # layer scale
    ({"no_ln_pre": True}, "ln_pre"),
])
def test_what_hf_clip_cannot_express_is_refused(tmp_path, vision_cfg, words):
    arch = write_arch(tmp_path, "odd-vit", **vision_cfg)
    with pytest.raises(UnsupportedConversion, match=words):
        openclip_to_hf_clip(tower(arch, arch.stem).visual)
