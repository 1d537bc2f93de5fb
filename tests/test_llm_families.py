"""Current LLM families end to end, on either stack: a tiny Qwen3-style LLM with `chatml` and a tiny Llama-3-style
LLM with `llama3` (byte-level tokenizers trained here), each saved to a directory and loaded from it as a recipe
does, through Stage 1 (`plain`, projector only) and Stage 2 (the family's template), then
exported to HF LLaVA, whose greedy answer equals `python -m llava_sft.generate`'s."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from data_prep.make_shapes import generate as make_shapes
from llava_sft.data.tokenizer_train import demo_corpus, make_chatml_style_tokenizer, make_llama3_style_tokenizer
from llava_sft.export import main as export_main
from llava_sft.train.trainer import train
from tests.tiny import run_config

pytestmark = [pytest.mark.slow, pytest.mark.latest_stack]

SIZES = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 512, "tie_word_embeddings": False}
FAMILIES = {
    "qwen3-chatml": ("qwen3", "chatml", make_chatml_style_tokenizer, {"head_dim": 16}),
    "llama3-llama3": ("llama", "llama3", make_llama3_style_tokenizer, {"rope_theta": 500000.0}),
}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes_families")
    make_shapes(out, seed=11, image_size=32, n_stage1=16, n_stage2=16, n_eval=2, text_only_frac=0.25)
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_current_llm_family_trains_both_stages_exports_and_generates(family, shapes, tmp_path):
    model_type, template, make_tokenizer, extra = FAMILIES[family]
    tokenizer_dir = make_tokenizer(demo_corpus(300), tmp_path / "tokenizer", vocab_size=600)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    llm = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, vocab_size=len(tokenizer), **SIZES,
                                                                **extra))
    llm.save_pretrained(tmp_path / "llm")
    tokenizer.save_pretrained(tmp_path / "llm")

    def config(stage: int, name: str, **kw):
        cfg = run_config(tmp_path / "llm", shapes, tmp_path / name, stage=stage, max_steps=3, **kw)
        cfg.model.llm.config, cfg.model.llm.path = None, str(tmp_path / "llm")
        if stage == 2:
            cfg.data.template = template
        return cfg

    train(config(1, "stage1"))
    stage1 = tmp_path / "stage1"
    assert (stage1 / "projector.safetensors").is_file() and not (stage1 / "llm").exists()
    train(config(2, "stage2", pretrained_projector=str(stage1)))
    stage2 = tmp_path / "stage2"
    trained = load_file(str(next((stage2 / "llm").glob("*.safetensors"))))
    base = load_file(str(next((tmp_path / "llm").glob("*.safetensors"))))
    assert any(not torch.equal(trained[k], base[k]) for k in base)  # Stage 2 trained the LLM

    hf_dir = tmp_path / "hf"
    assert export_main(["hf", "--model", str(stage2), "--out", str(hf_dir)]) == 0
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    image = Image.open(next((shapes / "images").glob("*.png"))).convert("RGB")
    image_path = tmp_path / "image.png"
    image.save(image_path)
    question = "What is the color of the circle?"
    cli = subprocess.run([sys.executable, "-m", "llava_sft.generate", "--model", str(stage2), "--image",
                          str(image_path), "--prompt", question, "--max-new-tokens", "8", "--device", "cpu"],
                         capture_output=True, text=True, check=True)
    ours = cli.stdout.strip().splitlines()[-1] if cli.stdout.strip() else ""

    processor = AutoProcessor.from_pretrained(hf_dir, **({"backend": "pil"} if int(
        __import__("transformers").__version__.split(".")[0]) >= 5 else {}))
    hf = LlavaForConditionalGeneration.from_pretrained(hf_dir).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    inputs = processor(images=image, text=processor.apply_chat_template(messages, add_generation_prompt=True),
                       return_tensors="pt")
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=8, do_sample=False)
    theirs = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert theirs and theirs == ours  # a non-empty answer, the same text
