"""LoRA / QLoRA Stage 2 (peft): what trains, what is saved, and merging into a plain model directory."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from data_prep.make_shapes import generate as make_shapes
from llava_sft.merge_lora import merge_lora
from llava_sft.model.llava import LlavaModel, load_tokenizer
from llava_sft.train.trainer import build, param_groups, train
from tests.tiny import TINY_LLAMA, run_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    make_shapes(out, seed=5, image_size=32, n_stage1=8, n_stage2=48, n_eval=4, text_only_frac=0.25)
    return out


@pytest.fixture(scope="module")
def base_llm(llama_tokenizer_dir, tmp_path_factory) -> Path:
    """A 'pretrained' base LLM on disk (random weights), as LoRA needs one to adapt."""
    cfg = dict(TINY_LLAMA, vocab_size=len(load_tokenizer(str(llama_tokenizer_dir))))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    out = tmp_path_factory.mktemp("base_llm")
    model.save_pretrained(out)
    return out


def lora_config(tokenizer_dir, data_dir, base, out, quantize=None, **train_kw):
    cfg = run_config(tokenizer_dir, data_dir, out, stage=2, lr=2e-3, projector_lr=5e-4, **train_kw)
    cfg.model.llm.path, cfg.model.llm.config = str(base), None
    from llava_sft.model.lora import LoraSettings

    cfg.model.lora = LoraSettings(r=8, alpha=16, dropout=0.05, quantize=quantize)
    return cfg


def logits(model: LlavaModel, tokenizer, image_dir: Path) -> torch.Tensor:
    from PIL import Image

    from llava_sft.constants import IMAGE_TOKEN_INDEX
    from llava_sft.data.images import ImageProcessor

    tower = model.vision_tower
    proc = ImageProcessor(tower.image_size, tower.image_mean, tower.image_std, "pad")
    image = proc(Image.open(sorted(image_dir.iterdir())[0])).unsqueeze(0)
    ids = tokenizer("USER: What color is the circle? ASSISTANT:").input_ids
    ids = torch.tensor([ids[:1] + [IMAGE_TOKEN_INDEX] + ids[1:]])
    with torch.no_grad():
        batch = model.embed(ids, torch.ones_like(ids), image)
        return model.llm(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask).logits.float()


def test_lora_adapts_every_llm_linear_layer_only(llama_tokenizer_dir, shapes_dir, base_llm, tmp_path):
    cfg = lora_config(llama_tokenizer_dir, shapes_dir, base_llm, tmp_path / "run")
    model, _, _ = build(cfg, torch.device("cpu"))
    report = model.set_trainable(True, True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert report["vision_tower"][0] == 0
    assert all(n.startswith("projector.") or ".lora_" in n for n in trainable)
    assert {n for n in trainable if n.startswith("projector.")} == {f"projector.{n}" for n, _ in model.projector.named_parameters()}
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable if ".lora_" in n}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not any("lm_head" in n or "embed_tokens" in n for n in trainable)
    # LLaVA-1.5 LoRA: the projector has its own LR, the adapters the run's LR; base weights in no group
    groups = param_groups(model, 0.0, 2e-4, 2e-5)
    by_lr: dict[float, set] = {}
    for g in groups:
        by_lr.setdefault(g["lr"], set()).update(id(p) for p in g["params"])
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[i] for i in by_lr[2e-5]} == {n for n in trainable if n.startswith("projector.")}
    assert {names[i] for i in by_lr[2e-4]} == {n for n in trainable if ".lora_" in n}


@pytest.mark.latest_stack
def test_lora_run_saves_adapter_and_merge_gives_the_same_logits_without_peft(
        llama_tokenizer_dir, shapes_dir, base_llm, tmp_path):
    run_dir = tmp_path / "lora"
    train(lora_config(llama_tokenizer_dir, shapes_dir, base_llm, run_dir, max_steps=4))
    files = {p.name for p in (run_dir / "llm").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert not any(f.startswith("model") and f.endswith(".safetensors") for f in files)  # no copy of the base
    adapter = load_file(run_dir / "llm" / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in adapter.items())  # the adapters trained
    # the base LLM on disk is untouched
    base_before = load_file(base_llm / "model.safetensors")

    model, tok, _ = LlavaModel.from_pretrained(run_dir)
    want = logits(model, tok, shapes_dir / "images")
    merged = merge_lora(run_dir, tmp_path / "merged")
    saved = json.loads((merged / "llava_config.json").read_text())
    assert saved["model"]["lora"] is None and not (merged / "llm" / "adapter_config.json").exists()
    plain, tok2, _ = LlavaModel.from_pretrained(merged)
    assert torch.allclose(logits(plain, tok2, shapes_dir / "images"), want, atol=1e-4)
    assert all(torch.equal(v, load_file(base_llm / "model.safetensors")[k]) for k, v in base_before.items())

    # the merged directory loads with peft unimportable
    code = ("import sys\n"
            "sys.modules['peft'] = None  # `import peft` now fails; transformers sees it as not installed\n"
            "from llava_sft.model.llava import LlavaModel\n"
            f"LlavaModel.from_pretrained({str(merged)!r})\n"
            "print('loaded')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 0 and "loaded" in result.stdout, result.stderr[-2000:]


def test_lora_needs_a_base_llm_from_a_path(llama_tokenizer_dir, shapes_dir, tmp_path):
    from llava_sft.model.lora import LoraSettings

    cfg = run_config(llama_tokenizer_dir, shapes_dir, tmp_path / "run", stage=2)
    cfg.model.lora = LoraSettings(r=4, alpha=8)
    with pytest.raises(ValueError, match="model.llm.path"):
        build(cfg, torch.device("cpu"))


def test_merge_refuses_a_plain_model_dir(llama_tokenizer_dir, shapes_dir, tmp_path):
    run_dir = tmp_path / "full"
    train(run_config(llama_tokenizer_dir, shapes_dir, run_dir, stage=2, max_steps=1))
    with pytest.raises(ValueError, match="not a LoRA model directory"):
        merge_lora(run_dir, tmp_path / "out")


def test_qlora_trains_adapters_on_a_4bit_base_and_merges(llama_tokenizer_dir, shapes_dir, base_llm, tmp_path):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    cfg = lora_config(llama_tokenizer_dir, shapes_dir, base_llm, tmp_path / "qlora", quantize="nf4", max_steps=2)
    model, _, _ = build(cfg, torch.device("cpu"))
    layer = model.llm.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.base_layer, bnb.nn.Linear4bit)
    assert layer.base_layer.weight.quant_state.nested  # double quantisation
    assert layer.base_layer.weight.quant_type == "nf4"
    assert layer.base_layer.compute_dtype == torch.float32  # the 4-bit layers compute in model.llm.dtype (fp32 here)
    assert all(p.dtype == torch.float32 for p in model.projector.parameters())  # the projector stays full precision
    del model
    train(cfg)
    run_dir = tmp_path / "qlora"
    assert (run_dir / "llm" / "adapter_model.safetensors").is_file()
    merged = merge_lora(run_dir, tmp_path / "merged")
    plain, _, _ = LlavaModel.from_pretrained(merged)
    assert not plain.quantized


def test_plain_lora_never_imports_bitsandbytes(base_llm, tmp_path):
    """peft looks for bitsandbytes layers whenever bitsandbytes is installed, and importing it prints kernel / GPU
    warnings; a LoRA run (and loading its adapter back) quantizes nothing, so bitsandbytes must stay unimported."""
    code = (
        "import sys\n"
        "from transformers import AutoModelForCausalLM\n"
        "from llava_sft.model.lora import LoraSettings, attach_lora, load_lora\n"
        f"llm = attach_lora(AutoModelForCausalLM.from_pretrained({str(base_llm)!r}), LoraSettings(r=4, alpha=8))\n"
        f"llm.save_pretrained({str(tmp_path / 'adapter')!r})\n"
        f"load_lora(AutoModelForCausalLM.from_pretrained({str(base_llm)!r}), {str(tmp_path / 'adapter')!r})\n"
        "print('bitsandbytes' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    assert out.returncode == 0, out.stderr[-2000:]
    # peft 0.17 (reproduction stack) leaves bitsandbytes alone; peft 0.21 (latest) imports it on `import peft`,
    # which nothing of ours can prevent: there only its log line is held back
    peft_alone = subprocess.run([sys.executable, "-c", "import sys, peft; print('bitsandbytes' in sys.modules)"],
                                capture_output=True, text=True, timeout=300)
    assert out.stdout.strip().splitlines()[-1] == peft_alone.stdout.strip().splitlines()[-1]
    assert "gemm_4bit" not in out.stderr
