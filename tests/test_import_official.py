"""Import of official LLaVA-1.5 checkpoints and LLaVA-Pretrain projectors, from tiny checkpoints in those layouts.

The expected outputs are computed the way LLaVA computes them (HF CLIP hidden_states[-2] without CLS ->
mm_projector Linear-GELU-Linear -> spliced into the Llama input embeddings), from the checkpoint tensors
directly, not through our model code.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from llava_sft.data.templates import get_template
from llava_sft.data.tokenize import tokenize_prompt
from llava_sft.import_llava import main as import_main
from llava_sft.model.llava import LlavaModel, load_tokenizer
from tests.tiny import TINY_LLAMA

CLIP_VISION = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 3,
               "image_size": 32, "patch_size": 8, "hidden_act": "quick_gelu", "projection_dim": 16}
CLIP_TEXT = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
             "vocab_size": 64, "max_position_embeddings": 16, "projection_dim": 16}
LLAVA_KEYS = {"mm_hidden_size": 48, "mm_projector_type": "mlp2x_gelu", "mm_vision_select_feature": "patch",
              "mm_vision_select_layer": -2, "mm_vision_tower": "openai/clip-vit-large-patch14-336",
              "image_aspect_ratio": "pad", "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
              "freeze_mm_mlp_adapter": False, "tune_mm_mlp_adapter": False, "mm_projector_lr": None,
              "tokenizer_model_max_length": 2048, "tokenizer_padding_side": "right", "use_mm_proj": True,
              "torch_dtype": "float32", "model_type": "llava", "architectures": ["LlavaLlamaForCausalLM"],
              "_name_or_path": "./checkpoints/vicuna-7b-v1-5"}


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny full CLIP (text + vision) saved as openai/clip-vit-large-patch14-336 is: model_type 'clip'."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("clip-vit-tiny")
    CLIPModel(CLIPConfig(text_config=CLIP_TEXT, vision_config=CLIP_VISION)).save_pretrained(out)
    return out


def llama_config(vocab: int) -> dict:
    return {k: v for k, v in dict(TINY_LLAMA, vocab_size=vocab, rms_norm_eps=1e-5).items() if k != "model_type"}


def write_llava_release(out, tokenizer_dir, seed=0, **overrides):
    """config.json + pytorch_model.bin + tokenizer, as liuhaotian/llava-v1.5-7b lays them out."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tokenizer = load_tokenizer(str(tokenizer_dir))
    fields = llama_config(len(tokenizer))
    state = {k: v * 4 if v.ndim == 2 else v for k, v in LlamaForCausalLM(LlamaConfig(**fields)).state_dict().items()}
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # saved by the transformers of 2023
    state.update({"model.mm_projector.0.weight": torch.randn(64, 48) * 0.2, "model.mm_projector.0.bias": torch.randn(64),
                  "model.mm_projector.2.weight": torch.randn(64, 64) * 0.2, "model.mm_projector.2.bias": torch.randn(64)})
    out.mkdir(parents=True)
    torch.save(state, out / "pytorch_model.bin")
    (out / "config.json").write_text(json.dumps({**fields, **LLAVA_KEYS, **overrides}))
    tokenizer.save_pretrained(out)
    return state


def llava_reference_logits(state, clip_dir, pixels, ids):
    """LLaVA-1.5's forward for one image, from the checkpoint tensors (prepare_inputs_labels_for_multimodal)."""
    from transformers import CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    clip = CLIPVisionModel.from_pretrained(clip_dir).eval()
    llama = LlamaForCausalLM(LlamaConfig(**llama_config(state["model.embed_tokens.weight"].shape[0]))).eval()
    llama.load_state_dict({k: v for k, v in state.items() if "mm_projector" not in k and "inv_freq" not in k})
    with torch.no_grad():
        feats = clip(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        p = lambda k: state[f"model.mm_projector.{k}"]  # noqa: E731
        image = F.linear(F.gelu(F.linear(feats, p("0.weight"), p("0.bias"))), p("2.weight"), p("2.bias"))[0]
        cut = ids.index(-200)
        embed = llama.get_input_embeddings()
        embeds = torch.cat([embed(torch.tensor(ids[:cut])), image, embed(torch.tensor(ids[cut + 1:]))])[None]
        return llama(inputs_embeds=embeds).logits


def test_llava_1_5_release_imports_and_computes_what_llava_computes(llama_tokenizer_dir, clip_dir, tmp_path):
    from llava_sft.generate import Answerer

    state = write_llava_release(tmp_path / "llava-v1.5-tiny", llama_tokenizer_dir)
    assert import_main(["--model", str(tmp_path / "llava-v1.5-tiny"), "--vision-tower", str(clip_dir),
                        "--out", str(tmp_path / "ours")]) == 0
    saved = json.loads((tmp_path / "ours" / "llava_config.json").read_text())
    assert saved["image"]["aspect"] == "pad" and saved["model"]["projector"] == "mlp2x_gelu"
    assert saved["model"]["vision"]["select_layer"] == -2 and saved["template"] == "vicuna_v1"
    assert saved["dims"]["tokens_per_image"] == 16  # (32 / 8)^2 patches, CLS dropped

    model, tokenizer, _ = LlavaModel.from_pretrained(tmp_path / "ours")  # self-contained: the tower travels with it
    ids = tokenize_prompt(get_template("vicuna_v1").generation_prompt("<image>\nWhat is it?"), tokenizer)
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        batch = model.embed(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), pixels)
        ours = model.llm(inputs_embeds=batch.inputs_embeds).logits
    reference = llava_reference_logits(state, clip_dir, pixels, ids)
    assert ours.shape == reference.shape and reference.abs().max() > 1.0
    assert torch.allclose(ours, reference, atol=1e-4, rtol=1e-5)
    from PIL import Image

    answer = Answerer(tmp_path / "ours", device="cpu").answer(["What is it?"], [Image.new("RGB", (40, 24), "red")], 4)
    assert isinstance(answer[0], str)  # generate loads and runs it


@pytest.mark.parametrize("layout", ["mlp2x_gelu", "linear"])
def test_llava_pretrain_projector_imports_as_a_stage1_output(llama_tokenizer_dir, clip_dir, tmp_path, layout):
    from llava_sft.config import from_dict
    from llava_sft.model.llava import ModelConfig

    torch.manual_seed(1)
    if layout == "linear":  # LLaVA v1's projector: one nn.Linear, keys without an index; a bare file
        weights = {"model.mm_projector.weight": torch.randn(64, 48), "model.mm_projector.bias": torch.randn(64)}
        src = tmp_path / "bare"
        src.mkdir()
    else:  # the run directory of a LLaVA-1.5 pretrain: config.json next to mm_projector.bin
        weights = {"model.mm_projector.0.weight": torch.randn(64, 48), "model.mm_projector.0.bias": torch.randn(64),
                   "model.mm_projector.2.weight": torch.randn(64, 64), "model.mm_projector.2.bias": torch.randn(64)}
        src = tmp_path / "pretrain"
        src.mkdir()
        (src / "config.json").write_text(json.dumps({**llama_config(100), **LLAVA_KEYS}))
    torch.save({k: v.half() for k, v in weights.items()}, src / "mm_projector.bin")  # released in fp16
    assert import_main(["--model", str(src / "mm_projector.bin"), "--vision-tower", str(clip_dir),
                        "--out", str(tmp_path / "stage1")]) == 0

    spec = {"vision": {"name": "hf_clip", "model": str(clip_dir), "pretrained": str(clip_dir)}, "projector": layout,
            "llm": {"config": dict(TINY_LLAMA, vocab_size=len(load_tokenizer(str(llama_tokenizer_dir))))},
            "tokenizer": str(llama_tokenizer_dir)}
    model = LlavaModel(from_dict(ModelConfig, spec))
    model.load_projector(tmp_path / "stage1")  # what a Stage-2 run does with train.pretrained_projector
    for key, value in weights.items():
        assert torch.equal(model.projector.state_dict()[key[len("model.mm_projector."):]], value.half().float()), key
    other = "linear" if layout == "mlp2x_gelu" else "mlp2x_gelu"
    with pytest.raises(ValueError, match=f"'{layout}' but this model uses '{other}'|does not fit"):
        LlavaModel(from_dict(ModelConfig, dict(spec, projector=other))).load_projector(tmp_path / "stage1")


@pytest.mark.parametrize("override, words", [
    ({"mm_use_im_start_end": True}, "mm_use_im_start_end"),
    ({"image_aspect_ratio": "anyres"}, "mm_patch_merge_type 'flat'"),
    ({"image_aspect_ratio": "anyres_max_9", "mm_patch_merge_type": "spatial_unpad"}, "image_aspect_ratio 'anyres_max_9'"),
    ({"mm_projector_type": "linear"}, "mm_projector_type 'linear' but the weights are 'mlp2x_gelu'"),
])
def test_unsupported_checkpoints_are_refused(llama_tokenizer_dir, clip_dir, tmp_path, capsys, override, words):
    write_llava_release(tmp_path / "llava", llama_tokenizer_dir, **override)
    code = import_main(["--model", str(tmp_path / "llava"), "--vision-tower", str(clip_dir), "--out", str(tmp_path / "o")])
    assert code == 2 and words in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_an_unreachable_vision_tower_asks_for_a_local_copy(llama_tokenizer_dir, tmp_path):
    write_llava_release(tmp_path / "llava", llama_tokenizer_dir)
    result = subprocess.run([sys.executable, "-m", "llava_sft.import_llava", "--model", str(tmp_path / "llava"),
                             "--out", str(tmp_path / "o")], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    assert "openai/clip-vit-large-patch14-336" in result.stderr and "--vision-tower" in result.stderr


def test_an_imported_release_exports_to_hf_llava_with_the_same_logits(llama_tokenizer_dir, clip_dir, tmp_path):
    """Official layout -> ours -> HF LlavaForConditionalGeneration (hf_clip tower: weights pass through)."""
    from transformers import LlavaForConditionalGeneration

    from llava_sft.export import main as export_main

    state = write_llava_release(tmp_path / "llava", llama_tokenizer_dir)
    assert import_main(["--model", str(tmp_path / "llava"), "--vision-tower", str(clip_dir), "--out", str(tmp_path / "ours")]) == 0
    assert export_main(["hf", "--model", str(tmp_path / "ours"), "--out", str(tmp_path / "hf")]) == 0
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    ids = tokenize_prompt(get_template("vicuna_v1").generation_prompt("<image>\nWhat is it?"),
                          load_tokenizer(str(llama_tokenizer_dir)))
    cut = ids.index(-200)
    hf_ids = ids[:cut] + [hf.config.image_token_id] * 16 + ids[cut + 1:]
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor([hf_ids]), pixel_values=pixels).logits
    reference = llava_reference_logits(state, clip_dir, pixels, ids)
    assert torch.allclose(logits[..., :reference.shape[-1]], reference, atol=1e-4, rtol=1e-5)


NEXT_KEYS = {"image_aspect_ratio": "anyres", "mm_patch_merge_type": "spatial_unpad",
             "image_grid_pinpoints": [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]}  # LLaVA-1.6's at 32 px


def test_llava_1_6_release_imports_and_computes_what_llava_computes(llama_tokenizer_dir, clip_dir, tmp_path):
    """A llava-v1.6 layout (anyres, spatial_unpad, model.image_newline): the imported model's logits on a 64x40
    image equal LLaVA's forward computed from the checkpoint tensors (HF CLIP on each tile -> mm_projector -> the
    reference's spatial_unpad merge, tests/reference_llava.py -> spliced)."""
    from PIL import Image
    from transformers import CLIPVisionModel

    from llava_sft.generate import Answerer
    from tests.reference_llava import reference_spatial_unpad

    state = write_llava_release(tmp_path / "llava-v1.6-tiny", llama_tokenizer_dir)
    torch.manual_seed(3)
    state["model.image_newline"] = torch.randn(64)
    torch.save(state, tmp_path / "llava-v1.6-tiny" / "pytorch_model.bin")
    config = json.loads((tmp_path / "llava-v1.6-tiny" / "config.json").read_text())
    (tmp_path / "llava-v1.6-tiny" / "config.json").write_text(json.dumps({**config, **NEXT_KEYS}))
    assert import_main(["--model", str(tmp_path / "llava-v1.6-tiny"), "--vision-tower", str(clip_dir),
                        "--out", str(tmp_path / "ours")]) == 0
    saved = json.loads((tmp_path / "ours" / "llava_config.json").read_text())
    assert saved["image"]["aspect"] == "anyres" and saved["image"]["pinpoints"] == NEXT_KEYS["image_grid_pinpoints"]
    assert saved["image"]["unpad_rounding"] == "reference"

    answerer = Answerer(tmp_path / "ours", device="cpu")
    image = Image.fromarray((torch.rand(40, 64, 3) * 255).byte().numpy())
    tiles, size, _ = answerer.processor.tiles(image)
    ids = tokenize_prompt(get_template("vicuna_v1").generation_prompt("<image>\nWhat is it?"), answerer.tokenizer)
    with torch.no_grad():
        batch = answerer.model.embed(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), tiles,
                                     image_sizes=[size])
        ours = answerer.model.llm(inputs_embeds=batch.inputs_embeds).logits

        clip = CLIPVisionModel.from_pretrained(clip_dir).eval()
        feats = clip(tiles, output_hidden_states=True).hidden_states[-2][:, 1:]
        p = lambda k: state[f"model.mm_projector.{k}"]  # noqa: E731
        projected = F.linear(F.gelu(F.linear(feats, p("0.weight"), p("0.bias"))), p("2.weight"), p("2.bias"))
        image_feats = reference_spatial_unpad(projected, (2, 2), 4, state["model.image_newline"], size)
        reference = llava_reference_logits_with(state, image_feats, ids)
    assert tiles.shape[0] == 5 and image_feats.shape[0] == 70  # 64x40 on 32-px tiles: counted in test_anyres_training
    assert ours.shape == reference.shape and torch.allclose(ours, reference, atol=1e-4, rtol=1e-5)


def llava_reference_logits_with(state, image_feats, ids):
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(**llama_config(state["model.embed_tokens.weight"].shape[0]))).eval()
    llama.load_state_dict({k: v for k, v in state.items() if "mm_projector" not in k and "inv_freq" not in k
                           and k != "model.image_newline"})
    cut = ids.index(-200)
    embed = llama.get_input_embeddings()
    embeds = torch.cat([embed(torch.tensor(ids[:cut])), image_feats, embed(torch.tensor(ids[cut + 1:]))])[None]
    return llama(inputs_embeds=embeds).logits
