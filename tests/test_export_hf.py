"""Export to HF LlavaForConditionalGeneration: same pixels, same tokens, same logits, same greedy text."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from llava_sft.config import from_dict
from llava_sft.constants import IMAGE_TOKEN_INDEX
from llava_sft.data.images import ImageProcessor
from llava_sft.data.templates import get_template, list_templates
from llava_sft.data.tokenize import tokenize_prompt
from llava_sft.data.tokenizer_train import demo_corpus, make_chatml_style_tokenizer, make_llama3_style_tokenizer
from llava_sft.export import main as export_main
from llava_sft.interop.chat_template import to_jinja
from llava_sft.interop.hf_llava import image_processor_for
from llava_sft.model.llava import LlavaModel, ModelConfig, load_tokenizer
from tests.conftest import EXTRA_LINES
from tests.test_auto_template import LLAMA31, QWEN25
from tests.tiny import model_dict

pytestmark = pytest.mark.latest_stack  # passes on constraints/latest.txt too (CI runs it there)

QUESTION = "What is in the image?"


def save_tiny_model(tokenizer_dir, out, seed=0, aspect="pad", select_feature="patch", select_layer=-2,
                    projector="mlp2x_gelu", template="vicuna_v1", llm_dtype="float32", system_prompt=None):
    torch.manual_seed(seed)
    spec = model_dict(tokenizer_dir, projector=projector)
    spec["vision"].update(select_feature=select_feature, select_layer=select_layer)
    spec["image_aspect"] = aspect
    spec["template"], spec["system_prompt"] = template, system_prompt
    spec["llm"]["dtype"] = llm_dtype  # what a recipe's model.llm.dtype does: the LLM loads and saves in it
    cfg = from_dict(ModelConfig, spec)
    cfg.llm.config["vocab_size"] = len(load_tokenizer(str(tokenizer_dir)))
    model = LlavaModel(cfg)
    with torch.no_grad():  # larger random weights, so that a greedy answer is a long, image-dependent token string
        for p in model.llm.parameters():
            if p.ndim == 2:
                p.mul_(8.0)
    model.save_pretrained(out, load_tokenizer(str(tokenizer_dir)), {"template": template})
    return out


def noise_image(size=(40, 24), seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def tokenizer_with_template(family: str, jinja: str, out):
    """A byte-level tokenizer directory (test-trained) carrying `jinja` as its chat template."""
    make = {"llama3": make_llama3_style_tokenizer, "chatml": make_chatml_style_tokenizer}[family]
    tok = load_tokenizer(str(make(demo_corpus(400) + EXTRA_LINES, out)), use_fast=True)
    tok.chat_template = jinja
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=[("pad", "patch", -2, "mlp2x_gelu", None), ("square", "cls_patch", -1, "mlp2x_gelu", None),
                                        ("pad", "patch", -2, "linear", None), ("pad", "patch", -2, "mlp2x_gelu", "llama3.1"),
                                        ("pad", "patch", -2, "mlp2x_gelu", "qwen2.5")],
                ids=["pad-patch", "square-cls", "linear-projector", "auto-llama3.1", "auto-qwen2.5-system"])
def exported(request, llama_tokenizer_dir, tmp_path_factory):
    """`linear`: the demo's projector since its recipe changed, and LLaVA v1's (configs/llava_v1/). `auto-*`: a model
    trained with `data.template: auto` on a tokenizer carrying Llama-3.1's template (the template writes BOS, the
    tokenizer adds it too) or Qwen2.5's (a default system prompt, replaced by the run's `model.system_prompt`)."""
    aspect, select_feature, select_layer, projector, chat = request.param
    root = tmp_path_factory.mktemp(f"export-{aspect}")
    tokenizer_dir, template, system = llama_tokenizer_dir, "vicuna_v1", None
    if chat == "llama3.1":
        tokenizer_dir, template = tokenizer_with_template("llama3", LLAMA31, root / "tok"), "auto"
    elif chat == "qwen2.5":
        tokenizer_dir, template = tokenizer_with_template("chatml", QWEN25, root / "tok"), "auto"
        system = "Answer in one word."
    ours = save_tiny_model(tokenizer_dir, root / "ours", aspect=aspect, select_feature=select_feature,
                           select_layer=select_layer, projector=projector, template=template, system_prompt=system)
    assert export_main(["hf", "--model", str(ours), "--out", str(root / "hf")]) == 0
    return ours, root / "hf"


# The `auto` exports' prompts for QUESTION with one image, written from the templates (tests/test_auto_template.py):
# the image at the start of the user turn (LLaVA's placement); Llama-3.1's BOS is not in the text (the tokenizer
# adds it: one BOS, checked by the ids below); Qwen2.5's default system prompt replaced by the run's.
AUTO_PROMPTS = {p[:15]: p for p in [
    "<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
    "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat is in the image?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "<|im_start|>system\nAnswer in one word.<|im_end|>\n<|im_start|>user\n<image>\nWhat is in the image?<|im_end|>\n"
    "<|im_start|>assistant\n"]}
TRANSFORMERS_5 = int(__import__("transformers").__version__.split(".")[0]) >= 5


def hf_inputs(hf_dir, image, question=QUESTION, pil=True):
    """The exported processor's inputs. transformers 5.x loads image processors with its torchvision backend unless
    asked for `backend="pil"`, the one that gives our (and LLaVA's) pixels exactly; `pil=False` takes the default."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(hf_dir, **({"backend": "pil"} if TRANSFORMERS_5 and pil else {}))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor, text, processor(images=image, text=text, return_tensors="pt")


def test_hf_export_gives_our_pixels_tokens_and_logits(exported):
    from transformers import LlavaForConditionalGeneration

    from llava_sft.generate import Answerer

    ours_dir, hf_dir = exported
    answerer = Answerer(ours_dir, device="cpu")
    hf = LlavaForConditionalGeneration.from_pretrained(hf_dir).eval()
    image = noise_image()
    processor, text, inputs = hf_inputs(hf_dir, image)

    assert text == answerer.prompt_for(QUESTION)  # the chat template renders our prompt
    if answerer.template.name == "auto":  # ... which is the model's own format (written out from the published one)
        assert text == AUTO_PROMPTS[text[:15]]
    assert torch.allclose(inputs["pixel_values"][0], answerer.processor(image), atol=1e-6)  # our preprocessing
    if TRANSFORMERS_5:  # the default (torchvision) backend's bicubic differs by at most one 8-bit level per value
        default_pixels = hf_inputs(hf_dir, image, pil=False)[2]["pixel_values"][0]
        one_level = 1 / 255 / min(answerer.processor.std)
        assert (default_pixels - answerer.processor(image)).abs().max() <= one_level + 1e-6

    ours_ids = tokenize_prompt(text, answerer.tokenizer)
    image_id = hf.config.image_token_id
    expanded = [t for i in ours_ids for t in ([image_id] * answerer.model.tokens_per_image if i == IMAGE_TOKEN_INDEX else [i])]
    assert inputs["input_ids"][0].tolist() == expanded  # same tokens, each image expanded to its feature tokens
    bos = answerer.tokenizer.bos_token_id
    assert bos is None or expanded.count(bos) <= 1  # never the template's BOS and the tokenizer's

    ids = torch.tensor([ours_ids])
    with torch.no_grad():
        batch = answerer.model.embed(ids, torch.ones_like(ids), answerer.processor(image)[None])
        our_logits = answerer.model.llm(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask).logits
        hf_logits = hf(**inputs).logits
    vocab = our_logits.shape[-1]
    assert hf_logits.shape[1] == our_logits.shape[1] and hf_logits.shape[-1] == vocab + 1  # + the <image> token
    assert our_logits.abs().max() > 1.0  # not a degenerate model
    assert torch.allclose(hf_logits[..., :vocab], our_logits, atol=1e-4, rtol=1e-5)


def test_hf_greedy_generation_equals_llava_sft_generate(exported, tmp_path):
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    from llava_sft.generate import Answerer

    ours_dir, hf_dir = exported
    image = noise_image(seed=1)
    image.save(tmp_path / "img.png")
    hf = LlavaForConditionalGeneration.from_pretrained(hf_dir).eval()
    processor, text, inputs = hf_inputs(hf_dir, image)
    with torch.no_grad():  # the exported generation_config (stop tokens, suppressed <image>) as is
        out = hf.generate(**inputs, max_new_tokens=12, do_sample=False)
    hf_new = out[0, inputs["input_ids"].shape[1]:]
    # same token ids as our model's generate ...
    answerer = Answerer(ours_dir, device="cpu")
    ids = torch.tensor([tokenize_prompt(text, answerer.tokenizer)])
    ours_new = answerer.model.generate(ids, torch.ones_like(ids), answerer.processor(image)[None], max_new_tokens=12,
                                       do_sample=False, eos_token_id=answerer.stop_ids, pad_token_id=0)[0]
    assert len(ours_new) >= 6 and hf_new.tolist() == ours_new.tolist()
    # ... and the same text as the command line (decoded with the exported slow tokenizer: the fast one that
    # AutoProcessor converts renders a random model's invalid UTF-8 byte pieces with other replacement characters)
    cli = subprocess.run([sys.executable, "-m", "llava_sft.generate", "--model", str(ours_dir), "--image",
                          str(tmp_path / "img.png"), "--prompt", QUESTION, "--max-new-tokens", "12", "--device", "cpu"],
                         capture_output=True, text=True, check=True)
    ours_text = cli.stdout.strip()  # the answer is all the command prints on stdout (a random one may hold "\n")
    hf_text = AutoTokenizer.from_pretrained(hf_dir, use_fast=False).decode(hf_new, skip_special_tokens=True).strip()
    assert len(ours_text) >= 10  # a real answer (12 tokens of a random model), not an immediate end of turn
    assert hf_text == ours_text


def test_a_bf16_llm_model_exports_in_one_dtype_that_loads_with_dtype_auto_and_the_pipeline(llama_tokenizer_dir,
                                                                                             tmp_path):
    """What a recipe saves (LLM in bf16, tower and projector trained in fp32) exports as one dtype: before, the
    fp32 projector met bf16 image features and `dtype="auto"` / the pipeline failed ("expected m1 and m2 to have
    the same dtype")."""
    import json

    from safetensors import safe_open
    from transformers import LlavaForConditionalGeneration, pipeline

    ours = save_tiny_model(llama_tokenizer_dir, tmp_path / "ours", llm_dtype="bfloat16")
    hf_dir = tmp_path / "hf"
    assert export_main(["hf", "--model", str(ours), "--out", str(hf_dir)]) == 0
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["dtype"] == config["text_config"]["dtype"] == config["vision_config"]["dtype"] == "bfloat16"
    for file in hf_dir.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"BF16"}, file
    hf = LlavaForConditionalGeneration.from_pretrained(hf_dir, dtype="auto").eval()
    assert {p.dtype for p in hf.parameters()} == {torch.bfloat16}
    image = noise_image(seed=2)
    processor, _, inputs = hf_inputs(hf_dir, image, pil=False)  # the pipeline's own default backend
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=8, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:]
    assert len(new) >= 4
    pipe = pipeline("image-text-to-text", model=str(hf_dir), dtype="auto", device="cpu")
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]}]
    answer = pipe(text=messages, max_new_tokens=8, do_sample=False, return_full_text=False)[0]["generated_text"]
    assert answer == processor.decode(new, skip_special_tokens=True)


@pytest.mark.parametrize("size", [(40, 24), (24, 40), (32, 32), (33, 17), (7, 50), (64, 64)])
@pytest.mark.parametrize("aspect", ["pad", "square"])
def test_hf_image_processor_matches_ours(size, aspect):
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    ours = ImageProcessor(32, mean, std, aspect)
    theirs = image_processor_for({"size": 32, "mean": mean, "std": std, "aspect": aspect})
    image = noise_image(size, seed=size[0])
    pixels = theirs(images=image, return_tensors="pt")["pixel_values"][0]
    assert pixels.shape == (3, 32, 32)
    assert torch.allclose(pixels, ours(image), atol=1e-6)
    if aspect == "pad" and size[0] != size[1]:  # padding is really on: plain resize + crop differs
        assert not torch.allclose(pixels, ImageProcessor(32, mean, std, "square")(image), atol=1e-3)


CONVERSATIONS = [
    [("<image>\nWhat is it?", "It is a cat.")],
    [("What is it? <image>", "It is red."), ("Is it big?", "Yes, it is big.")],
    [("Hello!", "Hi there."), ("How are you?", "I am fine.")],
    [("<image>\n<image>\nCompare the two images.", "The first one is red.")],
]


@pytest.mark.parametrize("name", list_templates())
@pytest.mark.parametrize("system", [None, "You are helpful."])
def test_chat_template_renders_our_templates(name, system, llama_tokenizer):
    """The Jinja chat template renders each conversation exactly as our template does (string equality)."""
    template = get_template(name, system)
    jinja = to_jinja(template)

    def render(messages, generation):
        return llama_tokenizer.apply_chat_template(messages, chat_template=jinja, tokenize=False,
                                                   add_generation_prompt=generation)

    for turns in CONVERSATIONS:
        if template.kind == "plain" and (len(turns) > 1 or "<image>" not in turns[0][0]):
            continue
        conv = [{"from": f, "value": v} for user, reply in turns for f, v in (("human", user), ("gpt", reply))]
        n_images = sum(u.count("<image>") for u, _ in turns)
        messages = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]} for t in conv]
        assert render(messages, False) == "".join(s.text for s in template.render(conv, n_images))
        *history, (question, _) = turns
        assert render(messages[:-1], True) == template.generation_prompt(question, history)
    # the processor's content format: an image item and a text item
    listed = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    assert render(listed, True) == template.generation_prompt("<image>\nWhat is it?")
    if template.kind == "chat":  # a system message replaces the template's system prompt
        with_system = [{"role": "system", "content": "Be brief."}] + listed
        assert render(with_system, True) == get_template(name, "Be brief.").generation_prompt("<image>\nWhat is it?")


def test_projectors_hf_cannot_express_are_refused(llama_tokenizer_dir, tmp_path):
    ours = save_tiny_model(llama_tokenizer_dir, tmp_path / "mlp3x", projector="mlp3x_gelu")
    result = subprocess.run([sys.executable, "-m", "llava_sft.export", "hf", "--model", str(ours), "--out",
                             str(tmp_path / "hf")], capture_output=True, text=True)
    assert result.returncode == 2
    assert "projector 'mlp3x_gelu' cannot be expressed" in result.stderr
    assert "Linear -> activation -> Linear" in result.stderr
    assert not (tmp_path / "hf").exists()


def test_hf_siglip_tower_exports_with_the_full_strategy(llama_tokenizer_dir, tmp_path):
    """A tower without CLS: 'patch' features are all tokens, i.e. HF's 'full' strategy, and the logits match."""
    import json

    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from tests.tiny_encoders import tiny_vision_configs

    torch.manual_seed(0)
    spec = model_dict(llama_tokenizer_dir)
    spec["vision"] = tiny_vision_configs(tmp_path / "enc")["hf_siglip"]
    cfg = from_dict(ModelConfig, spec)
    cfg.llm.config["vocab_size"] = len(load_tokenizer(str(llama_tokenizer_dir)))
    model = LlavaModel(cfg).eval()
    model.save_pretrained(tmp_path / "ours", load_tokenizer(str(llama_tokenizer_dir)), {"template": "vicuna_v1"})
    assert export_main(["hf", "--model", str(tmp_path / "ours"), "--out", str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["vision_feature_select_strategy"] == "full"
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    image = noise_image()
    text = get_template("vicuna_v1").generation_prompt("<image>\n" + QUESTION)
    inputs = processor(images=image, text=text, return_tensors="pt")
    ids = torch.tensor([tokenize_prompt(text, load_tokenizer(str(llama_tokenizer_dir)))])
    with torch.no_grad():
        batch = model.embed(ids, torch.ones_like(ids), inputs["pixel_values"])
        ours = model.llm(inputs_embeds=batch.inputs_embeds).logits
        theirs = hf(**inputs).logits
    assert inputs["input_ids"].shape[1] == ours.shape[1]  # 16 image tokens: no CLS to drop
    assert torch.allclose(theirs[..., :ours.shape[-1]], ours, atol=1e-4, rtol=1e-5)
