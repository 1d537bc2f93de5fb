"""Shrunk twins of a recipe's parts: same kind and on-disk layout, tiny sizes, built offline in seconds.

* LLM: the same architecture class (model_type from the real config.json, or from KNOWN_LLMS for the hub ids the
  recipes name), 2 layers of width 64 with the real MLP ratio and grouped-query layout, saved to a directory in
  the real checkpoint's dtype and loaded by the run through `model.llm.path` in the recipe's dtype.
* Tokenizer: the real one when it is on disk (beside the LLM or at model.tokenizer); else a SentencePiece
  tokenizer trained here with the Llama/Vicuna conventions (slow LlamaTokenizer, legacy, BOS, pad = unk).
* Vision tower: the same open_clip family at the recipe's image and patch size (ViT-L/14-336 keeps its 576
  tokens per image), width 64 and 3 blocks, its weights saved to a file and loaded through `vision.pretrained`.
* Data: the first records of the recipe's JSON and its images when they are on disk (LLAVA_DATA_ROOT), else
  generated records in the same layout (LLaVA-Pretrain captions, or mix665K-style conversations with text-only
  samples), with JPEGs of several aspect ratios in the real sub-folders.
"""
from __future__ import annotations

import copy
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

from llava_sft.data.sentencepiece_llama import save_tokenizer


class PreflightError(RuntimeError):
    """A rehearsal that cannot be set up; the message names the setting and the fix."""


def _llama(h: int, f: int, layers: int, heads: int, max_pos: int) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h, "intermediate_size": f,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": heads,
            "vocab_size": 32000, "max_position_embeddings": max_pos, "rms_norm_eps": 1e-5 if max_pos > 2048 else 1e-6,
            "tie_word_embeddings": False, "torch_dtype": "float16", "bos_token_id": 1, "eos_token_id": 2,
            "pad_token_id": 0}


# config.json fields of the LLMs the shipped recipes name (their model cards' config.json), for a preflight on a
# machine without the weights; a local model.llm.path is always read instead.
KNOWN_LLMS = {
    "lmsys/vicuna-7b-v1.5": _llama(4096, 11008, 32, 32, 4096),
    "lmsys/vicuna-13b-v1.5": _llama(5120, 13824, 40, 40, 4096),
    "lmsys/vicuna-7b-v1.3": _llama(4096, 11008, 32, 32, 2048),
    "lmsys/vicuna-13b-v1.3": _llama(5120, 13824, 40, 40, 2048),
}

TWIN_WIDTH, TWIN_LAYERS, TWIN_HEADS = 64, 2, 4


def real_llm_config(path: str) -> tuple[dict, str]:
    """(the real LLM's config.json as a dict, where it came from)."""
    local = Path(path) / "config.json"
    if local.is_file():
        return json.loads(local.read_text()), str(local)
    if path in KNOWN_LLMS:
        return copy.deepcopy(KNOWN_LLMS[path]), f"built-in copy of {path}'s config.json (weights not on disk)"
    raise PreflightError(f"model.llm.path={path!r} is neither a local model directory nor a known hub id "
                         f"({', '.join(KNOWN_LLMS)}): point LLAVA_LLM / model.llm.path at the model directory")


def real_tokenizer_dir(cfg) -> str | None:
    for candidate in (cfg.model.tokenizer, cfg.model.llm.path):
        if candidate and Path(candidate).is_dir() and any(Path(candidate).glob("tokenizer*")):
            return candidate
    return None


def make_tokenizer(cfg, texts: list[str], out_dir: Path):
    """(tokenizer, what it is): the real one when it is on disk, else a Vicuna-convention stand-in."""
    from llava_sft.data.tokenizer_train import train_llama_tokenizer
    from llava_sft.model.llava import load_tokenizer

    real = real_tokenizer_dir(cfg)
    if real:
        return load_tokenizer(real, use_fast=cfg.model.tokenizer_use_fast), f"the real tokenizer ({real})"
    path = train_llama_tokenizer(texts, out_dir / "tokenizer_standin")
    tokenizer = load_tokenizer(str(path), use_fast=False)
    what = "a stand-in SentencePiece Llama tokenizer (legacy, pad = unk)"
    if "auto" in (cfg.data.template, cfg.model.template):
        # `auto` renders with the tokenizer's own chat template, which only the real tokenizer has: the stand-in
        # carries Vicuna v1's format as Jinja, so the rehearsal runs the auto code path (spans found from the
        # template, end-of-turn </s> supervised) on a template of known shape
        from llava_sft.data.templates import get_template
        from llava_sft.interop.chat_template import to_jinja

        tokenizer.chat_template = to_jinja(get_template("vicuna_v1"))
        what += (" carrying Vicuna v1's format as its chat_template for template=auto (the model's own template "
                 "is checked against the data when the real run starts)")
    return tokenizer, what


def twin_llm_config(real: dict, vocab_size: int) -> dict:
    h, heads = real["hidden_size"], real["num_attention_heads"]
    kv = real.get("num_key_value_heads") or heads
    twin = dict(real)
    twin.update(hidden_size=TWIN_WIDTH, num_hidden_layers=TWIN_LAYERS, num_attention_heads=TWIN_HEADS,
                num_key_value_heads=TWIN_HEADS if kv == heads else max(1, TWIN_HEADS * kv // heads),
                intermediate_size=max(8, round(TWIN_WIDTH * real["intermediate_size"] / h / 8) * 8),
                vocab_size=vocab_size)
    twin.pop("head_dim", None)
    for key in ("_name_or_path", "transformers_version", "quantization_config"):
        twin.pop(key, None)
    return twin


def make_llm_twin(real: dict, tokenizer, out_dir: Path, vocab_size: int, seed: int = 0) -> tuple[Path, dict]:
    """A random-weight LLM of the real architecture class, saved (with the tokenizer) as the real one is."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = twin_llm_config(real, vocab_size)
    model_type = fields.pop("model_type")
    config = AutoConfig.for_model(model_type, **{k: v for k, v in fields.items() if k != "torch_dtype"})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    saved_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(str(real.get("torch_dtype")), torch.float32)
    from llava_sft.model.llava import save_llm

    save_llm(model.to(saved_dtype), out_dir, safe_serialization=True)
    save_tokenizer(tokenizer, out_dir)
    return out_dir, dict(fields, model_type=model_type)


# ------------------------------------------------------------------------------------------------ vision
def real_vision_shape(vision) -> dict:
    """open_clip's architecture config of the recipe's tower (shipped with open_clip: no download)."""
    import open_clip

    if vision.name != "openclip":
        raise PreflightError(f"model.vision.name={vision.name!r}: preflight builds twins of open_clip CLIP towers "
                             "(vision.name=openclip, as every shipped recipe); rehearse other encoders with their "
                             "own tests")
    if vision.model_config_file:
        arch = json.loads(Path(vision.model_config_file).read_text())
    else:
        arch = open_clip.get_model_config(vision.model)
        if arch is None:
            raise PreflightError(f"model.vision.model={vision.model!r} is not an open_clip architecture")
    return copy.deepcopy(arch)


TWIN_VISION = {"width": 64, "layers": 3}  # the twin tower's shrunk shape (its patch and input size are the real one's)


def make_vision_twin(vision, out_dir: Path) -> dict:
    """Write the twin's architecture JSON and weights; returns the `model.vision.*` overrides that load them."""
    import open_clip
    import torch

    arch = real_vision_shape(vision)
    v = arch["vision_cfg"]
    v.update(**TWIN_VISION, head_width=32)  # 2 heads; select_layer -2 needs >= 2 blocks
    v.pop("mlp_ratio", None)
    arch["text_cfg"].update(width=32, heads=1, layers=1)
    arch["embed_dim"] = 32
    name = f"{Path(vision.model).name}-twin"
    arch_file = out_dir / f"{name}.json"
    arch_file.write_text(json.dumps(arch, indent=1))
    open_clip.add_model_config(arch_file)
    torch.manual_seed(0)
    clip = open_clip.create_model(name, pretrained=None, force_quick_gelu=vision.quick_gelu)
    weights = out_dir / f"{name}.pt"
    torch.save(clip.state_dict(), weights)
    return {"model.vision.model": name, "model.vision.model_config_file": str(arch_file),
            "model.vision.pretrained": str(weights), "model.vision.cache_dir": "null"}


# -------------------------------------------------------------------------------------------------- data
COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
SHAPES = ["circle", "square", "triangle"]
SIZES = [(320, 240), (240, 320), (336, 336), (500, 375), (200, 120)]  # several aspect ratios: pad and crop differ


def _image(path: Path, rng: random.Random) -> str:
    color, shape = rng.choice(COLORS), rng.choice(SHAPES)
    img = Image.new("RGB", rng.choice(SIZES), tuple(rng.randrange(256) for _ in range(3)))
    w, h = img.size
    box = [w // 4, h // 4, 3 * w // 4, 3 * h // 4]
    draw = ImageDraw.Draw(img)
    {"circle": draw.ellipse, "square": draw.rectangle}.get(shape, lambda b, fill: draw.polygon(
        [(b[0], b[3]), ((b[0] + b[2]) // 2, b[1]), (b[2], b[3])], fill=fill))(box, fill=color)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="JPEG", quality=90)
    return f"a {color} {shape} on a plain background"


def generated_records(n: int, template: str, image_folder: Path, seed: int = 0) -> list[dict]:
    """LLaVA-Pretrain-style captions (`plain`) or mix665K-style conversations with ~1/4 text-only samples."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        if template == "plain":
            rel = f"{i // 1000:05d}/{i:09d}.jpg"
            caption = _image(image_folder / rel, rng)
            records.append({"id": f"{i:09d}", "image": rel, "conversations": [
                {"from": "human", "value": "Give a brief description of the image.\n<image>"},
                {"from": "gpt", "value": caption}]})
        elif i % 4 == 3:
            records.append({"id": f"text_{i}", "conversations": [
                {"from": "human", "value": f"Name a colour other than {rng.choice(COLORS)}."},
                {"from": "gpt", "value": f"{rng.choice(COLORS).capitalize()}."},
                {"from": "human", "value": "And a shape?"}, {"from": "gpt", "value": f"A {rng.choice(SHAPES)}."}]})
        else:
            rel = f"coco/train2017/{i:012d}.jpg"
            caption = _image(image_folder / rel, rng)
            color, shape = caption.split()[1:3]
            records.append({"id": f"{i:012d}", "image": rel, "conversations": [
                {"from": "human", "value": "<image>\nWhat is in the picture?"},
                {"from": "gpt", "value": f"The picture shows {caption}."},
                {"from": "human", "value": "What colour is the shape?\nAnswer the question using a single word or phrase."},
                {"from": "gpt", "value": color.capitalize()},
                {"from": "human", "value": "Which shape is it?"}, {"from": "gpt", "value": f"It is a {shape}."}]})
    return records


def make_data(cfg, n: int, out_dir: Path) -> tuple[dict, str, list[str]]:
    """(data.* overrides, where the records came from, their texts for a stand-in tokenizer)."""
    from llava_sft.data.dataset import read_records

    real = Path(cfg.data.path) if cfg.data.path else None
    if real is not None and real.is_file():
        records = read_records(real)[:n]
        if cfg.dpo is not None:
            from llava_sft.data.preference import normalize_record

            records = [normalize_record(r) for r in records]
        source = f"the first {len(records)} records of {real} (images from {cfg.data.image_folder})"
        folder = Path(cfg.data.image_folder).resolve()  # the launcher runs from the repository root
    else:
        folder = out_dir / "images"
        records = generated_records(n, cfg.data.template, folder)
        if cfg.dpo is not None:  # Stage 3: the last reply is the chosen one, a wrong one the rejected
            records = [{**r, "conversations": r["conversations"][:-1], "chosen": r["conversations"][-1]["value"],
                        "rejected": f"It is not {r['conversations'][-1]['value'].lower()}"} for r in records]
        source = f"{n} generated records in the layout of {real.name if real else 'the recipe'} ({real} is not on disk)"
    path = out_dir / "data.json"
    path.write_text(json.dumps(records))
    texts = [turn["value"].replace("<image>", "") for r in records for turn in r["conversations"]]
    texts += [r[k] for r in records for k in ("chosen", "rejected") if isinstance(r.get(k), str)]
    return {"data.path": str(path), "data.image_folder": str(folder), "data.shards": "null"}, source, texts
