"""Our model directory -> a Hugging Face `LlavaForConditionalGeneration` directory (no custom code needed).

What maps to what:
    vision tower       -> `model.vision_tower` (open_clip ViT converted to `CLIPVisionModel`, see clip_convert.py)
    select_layer       -> `vision_feature_layer` (both index HF hidden states: -2 = output of the penultimate block)
    select_feature     -> `vision_feature_select_strategy`: "patch" -> "default" (CLS dropped), "cls_patch" -> "full"
    mlp2x_gelu         -> `model.multi_modal_projector` (linear_1, exact GELU, linear_2)
    linear             -> the same module with `projector_hidden_act="linear"` (the identity in transformers'
                          ACT2FN, 4.x and 5.x): linear_1 = our Linear, linear_2 = the identity matrix, zero bias
                          (x @ I adds only exact zeros: the features are ours to the bit)
    LLM                -> `model.language_model` + `lm_head`
    tokenizer          -> + an `<image>` special token (the processor's placeholder) and the run's chat template as
                          Jinja: ours (chat_template.to_jinja), or for `auto` the model's own wrapped to place images
                          and the system prompt as training did (chat_template.wrap_model_template); the rendering of
                          probe conversations is checked against ours at export
    preprocessing      -> `LlavaImageProcessor`: `square` = resize shortest side + centre crop; `pad` = `do_pad`
                          (pad to a square with the mean colour, int(mean * 255), as ours) then the same
    stop strings       -> `generation_config.eos_token_id`
    AnyRes (`anyres`)  -> `LlavaNextForConditionalGeneration` + `LlavaNextImageProcessor` (PIL backend on 5.x):
                          `image_newline` -> `model.image_newline`; the pinpoints written **transposed**, as
                          transformers reads them as (height, width) (ours and LLaVA's are (width, height)); its
                          unpad rounds where LLaVA truncates, so a model trained with `unpad_rounding: reference`
                          is exported with a warning naming the sizes that differ (`hf`: exact); `anyres_max_N`
                          (LLaVA-OneVision) is refused for now

The `<image>` token is new to the LLM's vocabulary when the tokenizer did not have it: its embedding and
`lm_head` rows are zeros (its input embedding is always replaced by image features) and generation suppresses
it (`generation_config.suppress_tokens`), so logits over the original vocabulary and greedy outputs are ours.

What HF cannot express is refused (`UnsupportedConversion`), never exported approximately: projectors other
than `mlp2x_gelu` and `linear` (HF's projector is always Linear-activation-Linear), towers without an exporter below, LoRA
directories (merge them first), and tokenizers whose HF processor would tokenize prompts differently.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Callable

import torch

from llava_sft.constants import IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX
from llava_sft.data.templates import ChatTemplate, get_template
from llava_sft.data.tokenize import tokenize_with_images
from llava_sft.interop.chat_template import to_jinja, wrap_model_template
from llava_sft.interop.clip_convert import UnsupportedConversion, openclip_to_hf_clip_config, openclip_to_hf_clip_state
from llava_sft.model.llava import DTYPES, LlavaModel

log = logging.getLogger(__name__)
_TRANSFORMERS_MAJOR = int(version("transformers").split(".")[0])


@dataclass
class HFVision:
    """A vision tower in HF terms: its config (with `model_type`), weights, patch size, and whether it has a CLS token."""

    config: dict
    state: dict[str, torch.Tensor]
    patch_size: int
    has_cls: bool


def _openclip_vision(tower) -> HFVision:
    config = {"model_type": "clip_vision_model", **openclip_to_hf_clip_config(tower.visual)}
    return HFVision(config, openclip_to_hf_clip_state(tower.visual), config["patch_size"], has_cls=True)


def _hf_clip_vision(tower) -> HFVision:
    config = {**tower.model.config.to_dict(), "model_type": "clip_vision_model"}
    state = {k: v.detach() for k, v in tower.model.state_dict().items()}
    return HFVision(config, state, tower.model.config.patch_size, has_cls=True)


def _hf_siglip_vision(tower) -> HFVision:
    config = {**tower.model.config.to_dict(), "model_type": "siglip_vision_model"}
    state = {k: v.detach() for k, v in tower.model.state_dict().items()}
    return HFVision(config, state, tower.model.config.patch_size, has_cls=False)


# registry key of the vision tower -> its exporter; a tower not listed here is refused
VISION_EXPORTERS: dict[str, Callable[[torch.nn.Module], HFVision]] = {"openclip": _openclip_vision,
                                                                      "hf_clip": _hf_clip_vision,
                                                                      "hf_siglip": _hf_siglip_vision}


def register_vision_exporter(name: str, fn: Callable[[torch.nn.Module], HFVision]) -> None:
    VISION_EXPORTERS[name] = fn


def check_exportable(model: LlavaModel) -> None:
    cfg = model.cfg
    if cfg.lora is not None:
        raise UnsupportedConversion("this directory holds LoRA adapters: merge them first "
                                    "(python -m llava_sft.merge_lora) and export the merged directory")
    if cfg.projector not in HF_PROJECTOR_ACT:
        raise UnsupportedConversion(
            f"projector {cfg.projector!r} cannot be expressed by HF LlavaMultiModalProjector, which is always "
            "Linear -> activation -> Linear (our 'mlp2x_gelu', or 'linear' with the identity activation and an "
            "identity second layer); only those export to LlavaForConditionalGeneration")
    if cfg.vision.name not in VISION_EXPORTERS:
        raise UnsupportedConversion(f"vision tower {cfg.vision.name!r} has no LlavaForConditionalGeneration export; "
                                    f"exportable: {', '.join(sorted(VISION_EXPORTERS))}")


HF_PROJECTOR_ACT = {"mlp2x_gelu": "gelu", "linear": "linear"}  # our projector -> LlavaConfig.projector_hidden_act


def _projector_state(model: LlavaModel) -> dict[str, torch.Tensor]:
    proj = model.projector
    if model.cfg.projector == "linear":
        if type(proj) is not torch.nn.Linear or proj.bias is None:
            raise UnsupportedConversion(f"projector module {proj} is not one Linear with a bias")
        w = proj.weight.detach()
        eye = torch.eye(w.shape[0], dtype=w.dtype, device=w.device)
        return {"linear_1.weight": w, "linear_1.bias": proj.bias.detach(), "linear_2.weight": eye,
                "linear_2.bias": torch.zeros_like(proj.bias.detach())}
    if not (isinstance(proj, torch.nn.Sequential) and len(proj) == 3 and type(proj[1]) is torch.nn.GELU
            and proj[1].approximate == "none"):
        raise UnsupportedConversion(f"projector module {proj} is not Linear -> exact GELU -> Linear")
    return {f"linear_{i}.{p}": getattr(proj[j], p).detach() for i, j in ((1, 0), (2, 2)) for p in ("weight", "bias")}


def _llm_state(llm) -> dict[str, torch.Tensor]:
    prefix = llm.base_model_prefix + "."
    out = {}
    for key, value in llm.state_dict().items():
        if key.startswith(prefix):
            out["model.language_model." + key[len(prefix):]] = value.detach()
        elif key == "lm_head.weight":
            out[key] = value.detach()
        else:
            raise UnsupportedConversion(f"LLM weight {key!r} has no place in LlavaForConditionalGeneration")
    return out


def add_image_token(tokenizer, vocab_size: int) -> tuple[int, int]:
    """Adds `<image>` to the tokenizer if needed -> (image token id, vocabulary size the LLM must have)."""
    if IMAGE_PLACEHOLDER not in tokenizer.get_vocab():
        # transformers 5.x renamed additional_special_tokens to extra_special_tokens (and the keyword with it)
        key = "extra_special_tokens" if _TRANSFORMERS_MAJOR >= 5 else "additional_special_tokens"
        tokenizer.add_special_tokens({key: [IMAGE_PLACEHOLDER]}, **{f"replace_{key}": False})
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    return image_id, max(vocab_size, image_id + 1)


def _grow_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """Pads a [vocab, dim] matrix with zero rows up to `rows`."""
    if weight.shape[0] >= rows:
        return weight
    return torch.cat([weight, weight.new_zeros(rows - weight.shape[0], weight.shape[1])])


def hf_pinpoints(pinpoints) -> list[list[int]]:
    """Our (width, height) pinpoints as transformers reads them: (height, width)."""
    return [[h, w] for w, h in pinpoints]


def build_hf_state_and_config(model: LlavaModel, image_token_id: int, vocab: int):
    """(LlavaConfig or LlavaNextConfig, state dict) of the HF model holding exactly our weights."""
    from transformers import LlavaConfig, LlavaNextConfig

    check_exportable(model)
    vision = VISION_EXPORTERS[model.cfg.vision.name](model.vision_tower)
    select = model.cfg.vision.select_feature
    if select == "patch" and not vision.has_cls:
        strategy = "full"  # nothing to drop: every token is a patch
    else:
        strategy = {"patch": "default", "cls_patch": "full"}[select]
        if select == "cls_patch" and not vision.has_cls:
            raise UnsupportedConversion("select_feature 'cls_patch' on a tower without a CLS token")
    text_config = model.llm.config.to_dict()
    text_config.update(vocab_size=vocab, use_cache=True)  # our training-time use_cache=False is not the LLM's
    text_config.pop("_name_or_path", None)
    common = dict(
        vision_config=dict(vision.config), text_config=text_config, image_token_index=image_token_id,
        projector_hidden_act=HF_PROJECTOR_ACT[model.cfg.projector], vision_feature_select_strategy=strategy,
        vision_feature_layer=model.cfg.vision.select_layer, image_seq_length=model.tokens_per_image,
        multimodal_projector_bias=True,
    )
    if model.anyres is None:
        config = LlavaConfig(**common)
    else:
        config = LlavaNextConfig(**common, image_grid_pinpoints=hf_pinpoints(model.anyres.pinpoints))
        config.llava_sft_unpad_rounding = model.anyres.unpad_rounding  # stated in the export (config.json)
    state = {f"model.vision_tower.{k}": v for k, v in vision.state.items()}
    if model.anyres is not None:
        state["model.image_newline"] = model.image_newline.detach()
    state.update({f"model.multi_modal_projector.{k}": v for k, v in _projector_state(model).items()})
    for key, value in _llm_state(model.llm).items():
        state[key] = _grow_rows(value, vocab) if key in ("lm_head.weight", "model.language_model.embed_tokens.weight") else value
    return config, state, vision


def image_processor_for(saved_image: dict):
    """`LlavaImageProcessor` doing exactly our `ImageProcessor` (data/images.py) for `square` and `pad`;
    `LlavaNextImageProcessor` for `anyres` (its tiles: the same resize, black padding and crops as
    data/anyres.py, checked pixel by pixel in tests/test_export_llava_next.py)."""
    from transformers.image_utils import PILImageResampling

    size = saved_image["size"]
    if saved_image["aspect"] == "anyres":
        if _TRANSFORMERS_MAJOR >= 5:
            from transformers import LlavaNextImageProcessorPil as LlavaNextImageProcessor
        else:
            from transformers import LlavaNextImageProcessor
        return LlavaNextImageProcessor(
            do_resize=True, size={"shortest_edge": size}, image_grid_pinpoints=hf_pinpoints(saved_image["pinpoints"]),
            resample=PILImageResampling.BICUBIC, do_center_crop=True, crop_size={"height": size, "width": size},
            do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=list(saved_image["mean"]),
            image_std=list(saved_image["std"]), do_pad=True, do_convert_rgb=True,
        )
    if _TRANSFORMERS_MAJOR >= 5:  # 5.x's LlavaImageProcessor resizes with torchvision: pixels 1 level off from PIL's
        from transformers import LlavaImageProcessorPil as LlavaImageProcessor
    else:
        from transformers import LlavaImageProcessor

    size, aspect = saved_image["size"], saved_image["aspect"]
    if aspect not in ("square", "pad"):
        raise UnsupportedConversion(f"image aspect {aspect!r} has no HF image processor")
    return LlavaImageProcessor(
        do_pad=aspect == "pad", do_resize=True, size={"shortest_edge": size}, resample=PILImageResampling.BICUBIC,
        do_center_crop=True, crop_size={"height": size, "width": size}, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=list(saved_image["mean"]), image_std=list(saved_image["std"]), do_convert_rgb=True,
    )


PROBES = [("<image>\nWhat is in the image?", ()), ("Describe it. <image>", ()), ("Hello! How are you?", ()),
          ("<image>\n<image>\nCompare the two images, please.", ()), ("Is it red?\nAnswer yes or no.", ()),
          ("What now?", (("<image>\nWhat is it?", "A cat on a table."),))]


def probe_prompts(template: ChatTemplate) -> list[str]:
    """Prompts the exported tokenizer must tokenize as ours (checked at export)."""
    return [template.generation_prompt(question, list(history)) for question, history in PROBES]


def check_rendering(processor, template: ChatTemplate) -> None:
    """The processor's chat template must render each probe conversation, in the processor's message format (an
    image item, a text item), as our template renders it."""
    for question, history in PROBES:
        messages = []
        for user, reply in [*history, (question, None)]:
            items = [{"type": "image"}] * user.count(IMAGE_PLACEHOLDER)
            messages.append({"role": "user", "content": items + [{"type": "text",
                                                                  "text": user.replace(IMAGE_PLACEHOLDER, "")}]})
            if reply is not None:
                messages.append({"role": "assistant", "content": [{"type": "text", "text": reply}]})
        theirs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ours = template.generation_prompt(question, list(history))
        if theirs != ours:
            raise UnsupportedConversion(f"the exported chat template renders {messages!r} as {theirs!r}, training "
                                        f"rendered {ours!r}: an HF user would prompt the model in another format")


def check_tokenization(processor, tokenizer, template: ChatTemplate, tokens_per_image: int) -> None:
    """The HF processor must turn each probe prompt into our token ids (each image expanded to its tokens)."""
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    for prompt in probe_prompts(template):
        ours = []
        for t in tokenize_with_images(prompt, tokenizer):
            ours.extend([image_id] * tokens_per_image if t == IMAGE_TOKEN_INDEX else [t])
        expanded = prompt.replace(IMAGE_PLACEHOLDER, IMAGE_PLACEHOLDER * tokens_per_image)
        theirs = processor.tokenizer(expanded)["input_ids"]
        if theirs != ours:
            raise UnsupportedConversion(
                f"the exported tokenizer ({type(processor.tokenizer).__name__}) tokenizes the prompt {prompt!r} "
                f"differently from our pipeline ({theirs[:40]}... vs {ours[:40]}...): an HF model would see other tokens")


def export_hf(model_dir: str | Path, out_dir: str | Path, dtype: str | None = None) -> Path:
    """Writes the HF LLaVA directory (model, processor, generation config); returns its path."""
    from transformers import (
        AutoProcessor,
        GenerationConfig,
        LlavaForConditionalGeneration,
        LlavaNextForConditionalGeneration,
        LlavaNextProcessor,
        LlavaProcessor,
    )

    from llava_sft.generate import stop_token_ids

    out_dir = Path(out_dir)
    model, tokenizer, saved = LlavaModel.from_pretrained(model_dir, device="cpu")
    check_exportable(model)
    if model.anyres is not None and model.anyres.max_tiles is not None:
        raise UnsupportedConversion(f"image aspect {model.cfg.image_aspect!r} (LLaVA-OneVision's anyres_max_N) has no "
                                    f"LlavaNextForConditionalGeneration export (its interpolation is "
                                    f"LlavaOnevision's); generate with python -m llava_sft.generate")
    if model.anyres is not None and model.anyres.unpad_rounding != "hf":
        log.warning("this AnyRes model was trained with unpad_rounding=%s (LLaVA's int() truncation); transformers "
                    "rounds, so images whose unpadded size is a float just under an integer (e.g. 704x396 at 336 px: "
                    "1850 tokens trained, 1948 in transformers) get other features in the export; train with "
                    "model.unpad_rounding=hf for an exact export (config.json: llava_sft_unpad_rounding)",
                    model.anyres.unpad_rounding)
    name = saved.get("template") or saved["model"]["template"]
    template = get_template(name, saved["model"].get("system_prompt"), tokenizer=tokenizer)
    jinja = wrap_model_template(template) if name == "auto" else to_jinja(template)  # before <image> is added
    stops = stop_token_ids(tokenizer, template)
    old_vocab = model.llm_vocab_size
    image_id, vocab = add_image_token(tokenizer, old_vocab)
    config, state, vision = build_hf_state_and_config(model, image_id, vocab)
    # One dtype for every part: a saved Stage-2 model holds a bf16 LLM beside an fp32 tower and projector, and an
    # export "as saved" made `from_pretrained(dtype="auto")` / `pipeline("image-text-to-text")` fail with
    # "expected m1 and m2 to have the same dtype" at the projector. The LLM's dtype is the default (it is the
    # bulk of the weights and the one the recipe chose); the top-level and both sub-configs name it.
    dtype = dtype or str(model.llm.dtype).replace("torch.", "")
    state = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in state.items()}
    config.dtype = config.text_config.dtype = config.vision_config.dtype = dtype
    hf_class = LlavaForConditionalGeneration if model.anyres is None else LlavaNextForConditionalGeneration
    with torch.device("meta"):
        hf = hf_class(config)
    hf.load_state_dict(state, strict=True, assign=True)
    hf.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id,
        suppress_tokens=[image_id] if image_id >= old_vocab else None,
    )
    tokenizer.chat_template = jinja
    # a generic PreTrainedTokenizerFast (byte-level tokenizers: Llama-3, Qwen) also returns token_type_ids, which
    # LlavaForConditionalGeneration.generate refuses ("model_kwargs are not used by the model")
    tokenizer.model_input_names = ["input_ids", "attention_mask"]
    tokenizer.init_kwargs["model_input_names"] = tokenizer.model_input_names  # what save_pretrained writes
    processor = (LlavaProcessor if model.anyres is None else LlavaNextProcessor)(
        image_processor=image_processor_for(saved["image"]), tokenizer=tokenizer, patch_size=vision.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy, chat_template=tokenizer.chat_template,
        image_token=IMAGE_PLACEHOLDER, num_additional_image_tokens=1 if vision.has_cls else 0,
    )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    try:
        hf.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        reloaded = AutoProcessor.from_pretrained(tmp)
        check_rendering(reloaded, template)
        check_tokenization(reloaded, tokenizer, template, model.tokens_per_image)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %s -> %s (%s, image token %d)", model_dir, out_dir, hf_class.__name__, image_id)
    return out_dir
