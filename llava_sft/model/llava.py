"""The LLaVA model: frozen vision tower -> projector -> causal LM, with save/load and generation.

A saved model directory (what Stage 2 writes and `generate` loads) holds:
    llava_config.json       model config + image preprocessing + chat template (everything inference needs)
    projector.safetensors   projector weights (and, for AnyRes, `image_newline`: model/anyres.py)
    vision_tower.safetensors  the (frozen) vision tower weights, so the directory is self-contained
    llm/                    the causal LM and its tokenizer (Hugging Face `save_pretrained`); after a LoRA
                            run only the adapter + tokenizer, the base LLM being `model.llm.path` (see lora.py)
A Stage-1 checkpoint holds `llava_config.json` + `projector.safetensors` only.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import sys
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from llava_sft.config import LLMConfig, ModelConfig, VisionConfig, from_dict
from llava_sft.constants import IGNORE_INDEX
from llava_sft.data.anyres import AnyRes, image_token_counts, is_anyres, layout_for
from llava_sft.data.sentencepiece_llama import save_tokenizer
from llava_sft.model.anyres import merge_tiles, single_tile
from llava_sft.model.lora import attach_lora, is_adapter_param, is_lora, load_lora, quantization_config
from llava_sft.model.loss import loss_sum, supervised_logps
from llava_sft.model.packed_attention import llm_inputs
from llava_sft.model.projector import build_projector
from llava_sft.model.splice import splice_images
from llava_sft.model.vision import build_vision_tower, weights_loaded_afterwards

log = logging.getLogger(__name__)
CONFIG_FILE, PROJECTOR_FILE, VISION_FILE, LLM_DIR = "llava_config.json", "projector.safetensors", "vision_tower.safetensors", "llm"


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
NEWLINE_KEY = "image_newline"  # its name in projector.safetensors (the reference's `model.image_newline`)


def anyres_layout(cfg: ModelConfig, tower) -> AnyRes | None:
    """The AnyRes layout of a model config on its tower (None for `pad` / `square`)."""
    if not is_anyres(cfg.image_aspect):
        return None
    side = int(round(tower.num_tokens ** 0.5))
    if side * side != tower.num_tokens:
        raise ValueError(f"model.image_aspect={cfg.image_aspect} needs a square grid of patch tokens per tile; "
                         f"the tower gives {tower.num_tokens}")
    return layout_for(cfg.image_aspect, tower.image_size, side, cfg.image_grid_pinpoints, cfg.unpad_rounding)


def build_llm(cfg: LLMConfig, quantization=None) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = DTYPES[cfg.dtype]
    if quantization is not None:  # QLoRA: 4-bit base weights, placed on this process's device at load time
        if not cfg.path:
            raise ValueError("a quantized (QLoRA) LLM must be loaded from model.llm.path")
        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        return AutoModelForCausalLM.from_pretrained(cfg.path, dtype=dtype, attn_implementation=cfg.attn_implementation,
                                                    quantization_config=quantization, device_map={"": device})
    if cfg.path:
        return AutoModelForCausalLM.from_pretrained(cfg.path, dtype=dtype, attn_implementation=cfg.attn_implementation)
    if cfg.config:
        hf_cfg = dict(cfg.config)
        hf_config = AutoConfig.for_model(hf_cfg.pop("model_type"), **hf_cfg)
        return AutoModelForCausalLM.from_config(hf_config, dtype=dtype, attn_implementation=cfg.attn_implementation)
    raise ValueError("model.llm needs either `path` (a model directory) or `config` (a config dict)")


@contextmanager
def _no_deepspeed_probe():
    """transformers' `save_pretrained` unwraps the model with accelerate's `extract_model_from_parallel`, which
    imports deepspeed whenever it is installed, only to test `isinstance(model, DeepSpeedEngine)`. That import
    costs 6 s on a 2-core CPU (deepspeed compiles its MoE helpers with torch.compile, importing inductor), paid by
    the saving rank of every run, and by every test subprocess (measured with cProfile: 6.0 of a 1-step
    Stage-2 run's 16 s). A model can only be a DeepSpeedEngine if deepspeed is already imported, so while it is
    not, the probe answers False; under DeepSpeed nothing changes."""
    try:
        import accelerate.utils.other as unwrap_module
    except ImportError:  # without accelerate transformers unwraps by `.module` and imports nothing
        yield
        return
    original = getattr(unwrap_module, "is_deepspeed_available", None)
    if original is None or "deepspeed" in sys.modules:
        yield
        return
    unwrap_module.is_deepspeed_available = lambda: False
    try:
        yield
    finally:
        unwrap_module.is_deepspeed_available = original


def save_llm(llm: nn.Module, out_dir: str | Path, **kwargs) -> None:
    """`llm.save_pretrained(out_dir, **kwargs)` (a transformers or peft model) without importing deepspeed."""
    with _no_deepspeed_probe():
        llm.save_pretrained(out_dir, **kwargs)


def load_tokenizer(path: str, use_fast: bool = False):
    """The tokenizer of a model directory. `use_fast=False` (the recipes': LLaVA's reference ids come from the slow
    class) falls back to the fast class, with a warning naming it, when the directory has only `tokenizer.json`
    (no vocabulary files for the slow class: many current releases), where transformers raised a TypeError about
    a None path."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, use_fast=use_fast)
    except (TypeError, OSError, ValueError) as e:
        if use_fast or not (Path(path) / "tokenizer.json").is_file():
            raise
        tok = AutoTokenizer.from_pretrained(path, use_fast=True)
        log.warning("%s: the slow tokenizer class could not load (%s: %s): the directory has tokenizer.json only; "
                    "using the fast class %s (model.tokenizer_use_fast=true says so and silences this)", path,
                    type(e).__name__, str(e).splitlines()[0][:120] if str(e) else "", type(tok).__name__)
    else:
        log.info("tokenizer %s: %s", path, type(tok).__name__)
    from llava_sft.data.sentencepiece_llama import check_reproducible

    check_reproducible(tok)
    if tok.pad_token is None:  # LLaVA pads Llama/Vicuna with <unk>; others with EOS
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    tok.model_max_length = int(1e9)  # we enforce our own max length after image expansion
    return tok


class LlavaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, llm: nn.Module | None = None, vision: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        self.vision_tower = vision if vision is not None else build_vision_tower(cfg.vision)
        self.llm = llm if llm is not None else build_llm(cfg.llm, quantization_config(cfg.lora, DTYPES[cfg.llm.dtype]))
        self.llm.config.use_cache = False
        self.projector = build_projector(cfg.projector, self.vision_tower.hidden_size, self.llm_hidden_size)
        self.anyres = anyres_layout(cfg, self.vision_tower)
        if self.anyres is not None:  # llava_arch.py: randn / sqrt(hidden), a new parameter of Stage 2; drawn from
            # the run's seed alone (not the global stream, whose position differs when ZeRO-3 loads the LLM
            # partitioned), so that every engine starts from the same newline
            hidden = self.llm_hidden_size
            generator = torch.Generator().manual_seed(torch.initial_seed())
            self.image_newline = nn.Parameter(torch.randn(hidden, generator=generator) / hidden ** 0.5)
        self.supervised_logits_only = True  # model/loss.py; False computes the logits at every position
        self.text_only_anchor = "modules"  # what a text-only micro-batch runs for the engine (_text_only_anchor)
        self.preference = None  # Stage 3: a model/dpo.py PreferenceLoss (set by train/build.py for a `dpo:` run)

    @property
    def reference_model(self) -> "LlavaModel | None":
        """dpo.reference=copy: the frozen starting model (kept outside the module tree: no engine wraps, shards or
        saves it, and it is not in the state dict)."""
        return self.__dict__.get("_reference_model")

    def keep_reference_copy(self, reference: nn.Module | None = None) -> None:
        """Keep `reference` (the starting model, frozen, possibly wrapped by the engine that shards it:
        train/reference.py), or a deep copy of this model as it is now."""
        if reference is None:
            import copy

            reference = copy.deepcopy(self)
            reference.preference = None
        reference.eval()  # not chained: DeepSpeedEngine.eval() returns None
        reference.requires_grad_(False)
        self.__dict__["_reference_model"] = reference

    def add_lora(self, gradient_checkpointing: bool = False) -> None:
        """Fresh LoRA adapters on the LLM, as `cfg.lora` says (the base LLM must come from a path)."""
        if self.cfg.lora is None:
            raise ValueError("model.lora is not set")
        if not self.cfg.llm.path:
            raise ValueError("LoRA adapts a pretrained LLM: set model.llm.path (a model directory), not model.llm.config")
        self.llm = attach_lora(self.llm, self.cfg.lora, gradient_checkpointing)

    @property
    def quantized(self) -> bool:
        return bool(getattr(self.llm, "is_loaded_in_4bit", False))

    @property
    def llm_hidden_size(self) -> int:
        # from the module's attributes, never from a weight's shape (partitioned to nothing under ZeRO-3)
        emb = self.llm.get_input_embeddings()
        return int(getattr(emb, "embedding_dim", None) or self.llm.config.hidden_size)

    @property
    def llm_vocab_size(self) -> int:
        emb = self.llm.get_input_embeddings()
        return int(getattr(emb, "num_embeddings", None) or self.llm.config.vocab_size)

    @property
    def tokens_per_image(self) -> int:
        """Feature tokens of one image (`pad`, `square`) or of one tile (AnyRes: see `image_tokens`)."""
        return self.vision_tower.num_tokens

    def image_tokens(self, sizes: list) -> list[int]:
        """Feature tokens of each image of a sample, from the sizes its processor reported (None: one tile)."""
        return image_token_counts(sizes, self.tokens_per_image, self.anyres)

    # ------------------------------------------------------------------ forward
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[N,3,H,W] pixels -> [N, tokens_per_image, llm_hidden] projected features."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.vision_tower_trains):
            feats = self.vision_tower(images)
        proj_dtype = next(self.projector.parameters(), feats).dtype
        return self.projector(feats.to(proj_dtype))

    def image_features(self, images: torch.Tensor, image_sizes: list | None = None):
        """[N,3,H,W] pixels -> [N, tokens_per_image, llm_hidden]; for AnyRes the tiles of all images in order and
        each image's size (None for a one-tile image) -> a list of [tokens_i, llm_hidden] (model/anyres.py)."""
        features = self.encode_images(images)
        if self.anyres is None:
            return features
        if image_sizes is None:
            raise ValueError("an AnyRes model needs image_sizes (each image's (width, height), None for one tile)")
        counts = [1 if size is None else self.anyres.num_tiles(tuple(size)) for size in image_sizes]
        if sum(counts) != features.shape[0]:
            raise ValueError(f"{features.shape[0]} tiles for images of sizes {image_sizes} ({sum(counts)} expected)")
        return [single_tile(f, self.image_newline) if size is None else
                merge_tiles(f, tuple(size), self.anyres, self.image_newline)
                for f, size in zip(features.split(counts), image_sizes, strict=True)]

    def embed(self, input_ids, attention_mask, images=None, labels=None, padding_side="right", image_sizes=None,
              image_index=None):
        """The spliced LLM inputs; `image_index` (a batch whose rows share images: the sides of preference pairs)
        says which image each placeholder shows, each image being encoded once (data/dataset.py: image_fields)."""
        has = images is not None and images.shape[0] > 0
        features = self.image_features(images, image_sizes) if has else None
        if features is not None and image_index is not None:
            features = (features[image_index.to(features.device)] if torch.is_tensor(features)
                        else [features[i] for i in image_index.tolist()])
        return splice_images(input_ids, attention_mask, features, self.llm.get_input_embeddings(), labels, padding_side)

    @property
    def attn_implementation(self) -> str:
        return getattr(self.llm.config, "_attn_implementation", None) or self.cfg.llm.attn_implementation

    def logits_and_labels(self, input_ids, attention_mask, images=None, labels=None, image_sizes=None):
        """LLM logits at every position and the labels aligned with them (unshifted), for inspection and tests
        (training uses `forward`, which computes the logits only where a label is). `attention_mask` may hold the
        segment ids of packed rows (data/packing.py); the logits are then [1, N, V] over the real tokens, row by
        row, on the flash (varlen) path and [B, T, V] otherwise (see model/packed_attention.py)."""
        batch = self.embed(input_ids, attention_mask, images, labels, image_sizes=image_sizes)
        kwargs, labels = llm_inputs(batch, self.attn_implementation)
        return self.llm(**kwargs, use_cache=False).logits, labels

    def forward(self, input_ids, attention_mask, images=None, labels=None, image_sizes=None, image_index=None,
                pairs=None, reference_logps=None, return_logps=False):
        """Returns (sum of token losses, number of supervised tokens); the caller normalises. The LM head runs
        only at supervised positions (model/loss.py) unless `supervised_logits_only` is False.

        Stage 3 (`self.preference`, model/dpo.py): (sum of the pair losses, number of pairs, their statistics) for
        a batch of `pairs` preference pairs (with a precomputed reference, its `reference_logps` per sequence);
        `return_logps`: (each sequence's summed log-prob, its scored tokens) instead, for the reference pass."""
        anchor = self._text_only_anchor(images, input_ids.device)
        batch = self.embed(input_ids, attention_mask, images, labels, image_sizes=image_sizes, image_index=image_index)
        if self.preference is None and not return_logps:
            kwargs, labels = llm_inputs(batch, self.attn_implementation)
            loss, count = loss_sum(self.llm, kwargs, labels, self.supervised_logits_only)
            out = [loss, count]
        else:
            logps, counts = self.sequence_logps(batch, attention_mask)
            if return_logps:
                return logps.detach(), counts
            reference = self._reference_logps(batch, attention_mask, reference_logps, input_ids, images, labels,
                                              image_sizes, image_index, logps)
            out = list(self.preference(logps, counts, reference, int(pairs or 0)))
            loss = out[0]
        if anchor is None and torch.is_grad_enabled() and not loss.requires_grad:
            anchor = self._param_anchor()  # a text-only batch under a frozen LLM: give backward something to do
        out[0] = loss + anchor if anchor is not None else loss
        return tuple(out)

    def sequence_logps(self, batch, attention_mask):
        """(summed log-prob of each sequence's scored tokens [S], their number [S]) of a spliced batch, sequences
        in order of appearance (model/dpo.py: sequence_index)."""
        from llava_sft.model.dpo import sequence_index, sequence_sums

        segments = batch.segment_ids if batch.segment_ids is not None else batch.attention_mask
        which = sequence_index(attention_mask, segments)[:, 1:][batch.labels[:, 1:].ne(IGNORE_INDEX)]
        kwargs, labels = llm_inputs(batch, self.attn_implementation)
        logps = supervised_logps(self.llm, kwargs, labels, self.supervised_logits_only)
        sequences = int(attention_mask.max(dim=1).values.clamp(min=1).sum())
        return sequence_sums(logps, which, sequences)

    def _reference_logps(self, batch, attention_mask, given, input_ids, images, labels, image_sizes, image_index,
                         policy):
        mode = self.preference.reference
        if mode == "precomputed":
            if given is None:  # a no-op batch (pairs=0) carries none and needs none
                return torch.zeros_like(policy).detach()
            return given
        with torch.no_grad():
            if mode == "adapters_off":
                detached = dataclasses.replace(batch, inputs_embeds=batch.inputs_embeds.detach())
                with self.llm.disable_adapter():
                    return self.sequence_logps(detached, attention_mask)[0]
            reference = self.reference_model
            if reference is None:
                raise RuntimeError("dpo.reference=copy but no reference copy was kept (keep_reference_copy)")
            # through its forward: a ZeRO-3 / FSDP2 copy gathers its shards in its modules' forward hooks
            return reference(input_ids, attention_mask, images, labels, image_sizes=image_sizes,
                             image_index=image_index, return_logps=True)[0]

    def _text_only_anchor(self, images, device):
        """A zero that reaches the projector (and, under ZeRO-3, the tower) when a micro-batch has no image, as the
        engine needs (`text_only_anchor`, set by the trainer):
          "modules" (ZeRO-3): one blank image through the tower and the projector before the LLM, as an image
              batch does -- ZeRO-3's module hooks issue collectives, so every rank must call the same modules in
              the same order whatever its micro-batch holds (else two ranks hang);
          "params" (DDP, ZeRO-1/2): the projector's (and a training tower's) parameters times zero -- every
              trainable parameter must get a gradient, and the tower's forward is not needed for that;
          "none" (one process): nothing (the projector simply gets no gradient from this micro-batch)."""
        if not features_unused(images) or self.text_only_anchor == "none":
            return None
        if self.text_only_anchor == "params":  # for gradients only
            return self._param_anchor() if torch.is_grad_enabled() else None
        # "modules": without gradients too (DPO's reference passes): the collectives are in the forward
        size = self.vision_tower.image_size
        blank = self.encode_images(torch.zeros(1, 3, size, size, device=device)).sum() * 0.0
        return blank + self.image_newline.sum() * 0.0 if self.anyres is not None else blank

    def _param_anchor(self):
        # every trainable parameter a text-only forward does not reach: the projector, and the tower when
        # train.train_vision_tower (leaving it out made DDP raise at the next forward: issue 38)
        trainable = [p for m in (self.projector, self.vision_tower) for p in m.parameters() if p.requires_grad]
        if self.anyres is not None and self.image_newline.requires_grad:
            trainable.append(self.image_newline)
        return sum(p.sum() for p in trainable) * 0.0 if trainable else None

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, images=None, image_sizes=None, **gen_kwargs) -> torch.Tensor:
        """Left-padded prompts in, new token ids out (HF `generate` with KV cache)."""
        batch = self.embed(input_ids, attention_mask, images, padding_side="left", image_sizes=image_sizes)
        gen_kwargs.setdefault("use_cache", True)
        return self.llm.generate(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask, **gen_kwargs)

    # ----------------------------------------------------------------- freezing
    @property
    def vision_tower_trains(self) -> bool:
        return any(p.requires_grad for p in self.vision_tower.parameters())

    def set_trainable(self, train_projector: bool, train_llm: bool,
                      train_vision_tower: bool = False) -> dict[str, tuple[int, int]]:
        """Freeze/unfreeze modules (the vision tower is frozen unless `train_vision_tower`; it stays in eval mode
        either way: the CLIP ViTs have no dropout or batch norm, so training it changes only its weights);
        returns {module: (trainable, total)}."""
        self.vision_tower.requires_grad_(train_vision_tower)
        if train_vision_tower:
            self._freeze_tower_parameters_without_gradient()
        self.projector.requires_grad_(train_projector)
        if self.anyres is not None:  # trained with the LLM, as in LLaVA-NeXT's Stage 2 (LoRA: trained too, it is new)
            self.image_newline.requires_grad_(train_llm)
        if is_lora(self.llm):  # the base LLM stays frozen; "training the LLM" trains its adapters
            for name, param in self.llm.named_parameters():
                param.requires_grad_(train_llm and is_adapter_param(name))
        else:
            self.llm.requires_grad_(train_llm)
        report = {}
        for name, module in (("vision_tower", self.vision_tower), ("projector", self.projector), ("llm", self.llm)):
            params = list(module.parameters())
            report[name] = (sum(numel(p) for p in params if p.requires_grad), sum(numel(p) for p in params))
        return report

    def _freeze_tower_parameters_without_gradient(self) -> None:
        """A training tower trains what its features depend on: the blocks after the selected layer (LLaVA reads
        the penultimate one), the final norm and CLIP's projection never get a gradient. They stay frozen, measured
        by one backward pass of a blank image (any encoder): DDP (find_unused_parameters=False) raised at the second
        step with them trainable (issue 38), and AdamW's weight decay would have moved them. In LLaVA-NeXT's runs
        (DeepSpeed, weight decay 0) they got zero gradients and did not move either."""
        tower = self.vision_tower
        params = [(n, p) for n, p in tower.named_parameters() if p.requires_grad]
        device = next((p.device for _, p in params), torch.device("cpu"))
        with torch.enable_grad():
            out = tower(torch.zeros(1, 3, tower.image_size, tower.image_size, device=device))
            grads = torch.autograd.grad(out.float().sum(), [p for _, p in params], allow_unused=True)
        unused = [(n, p) for (n, p), g in zip(params, grads, strict=True) if g is None]
        for _, p in unused:
            p.requires_grad_(False)
        if unused:
            log.info("vision tower: %d of %d parameter tensors do not reach the selected features and stay frozen "
                     "(%s)", len(unused), len(params), ", ".join(n for n, _ in unused[:6]) +
                     (", ..." if len(unused) > 6 else ""))

    # ------------------------------------------------------------- save / load
    def save_projector(self, out_dir: str | Path, extra: dict | None = None, state_dict: dict | None = None) -> None:
        """`state_dict`: the whole model's weights when the modules' own are partitioned (ZeRO-3, gathered)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        state = _sub_state(state_dict, "projector.") if state_dict is not None else self.projector.state_dict()
        if self.anyres is not None:
            state[NEWLINE_KEY] = state_dict[NEWLINE_KEY] if state_dict is not None else self.image_newline
        state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        save_file(state, out_dir / PROJECTOR_FILE, metadata={"projector": self.cfg.projector})
        self._write_config(out_dir, extra)

    def save_pretrained(self, out_dir: str | Path, tokenizer, extra: dict | None = None,
                        state_dict: dict | None = None) -> None:
        """A self-contained model directory that `LlavaModel.from_pretrained` and `generate` load.

        `state_dict`: the whole model's weights (e.g. gathered from ZeRO-3 partitions) instead of the modules' own."""
        out_dir = Path(out_dir)
        self.save_projector(out_dir, extra, state_dict)
        if self.cfg.vision.model_config_file:  # a custom open_clip architecture travels with the model
            arch_dir = out_dir / "vision_arch"
            arch_dir.mkdir(exist_ok=True)
            shutil.copy(self.cfg.vision.model_config_file, arch_dir / arch_file_name(self.cfg.vision))
        vision = _sub_state(state_dict, "vision_tower.") if state_dict is not None else self.vision_tower.state_dict()
        save_file({k: v.detach().cpu().contiguous() for k, v in vision.items()}, out_dir / VISION_FILE)
        if state_dict is None:
            save_llm(self.llm, out_dir / LLM_DIR, safe_serialization=True)
        else:
            save_llm(self.llm, out_dir / LLM_DIR, state_dict=_sub_state(state_dict, "llm."), safe_serialization=True)
        save_tokenizer(tokenizer, out_dir / LLM_DIR)

    def _write_config(self, out_dir: Path, extra: dict | None) -> None:
        payload = {
            "format": "llava_sft/1",
            "model": asdict(self.cfg),
            "dims": {"vision_hidden": self.vision_tower.hidden_size, "llm_hidden": self.llm_hidden_size,
                     "tokens_per_image": self.tokens_per_image},
            "image": {"size": self.vision_tower.image_size, "mean": list(self.vision_tower.image_mean),
                      "std": list(self.vision_tower.image_std), "aspect": self.cfg.image_aspect},
        }
        if self.anyres is not None:  # data/images.py rebuilds the layout from these
            payload["image"].update(pinpoints=[list(p) for p in self.anyres.pinpoints], side=self.anyres.side,
                                    unpad_rounding=self.anyres.unpad_rounding)
        payload.update(extra or {})
        (out_dir / CONFIG_FILE).write_text(json.dumps(payload, indent=2))

    def load_projector(self, path: str | Path, quiet: bool = False) -> None:
        """Load a Stage-1 projector (a directory or the .safetensors file); fail clearly if it does not fit."""
        path = Path(path)
        file = path / PROJECTOR_FILE if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"pretrained projector not found: {file}")
        cfg_file = file.parent / CONFIG_FILE
        if cfg_file.is_file():
            saved = json.loads(cfg_file.read_text())
            kind = saved["model"]["projector"]
            if kind != self.cfg.projector:
                raise ValueError(f"pretrained projector {file} is {kind!r} but this model uses {self.cfg.projector!r}")
            want = {"vision_hidden": self.vision_tower.hidden_size, "llm_hidden": self.llm_hidden_size}
            got = {k: saved["dims"][k] for k in want}
            if got != want:
                raise ValueError(f"pretrained projector {file} has dims {got} but this model needs {want}")
        state = load_file(str(file))
        newline = state.pop(NEWLINE_KEY, None)
        if newline is not None and self.anyres is None:
            raise ValueError(f"pretrained projector {file} comes with an AnyRes image_newline but this model uses "
                             f"image_aspect={self.cfg.image_aspect!r}")
        expected = self.projector.state_dict()
        bad = {k: (tuple(v.shape), tuple(expected[k].shape)) for k, v in state.items() if k in expected and v.shape != expected[k].shape}
        if set(state) != set(expected) or bad:
            raise ValueError(
                f"pretrained projector {file} does not fit projector {self.cfg.projector!r}: "
                f"keys {sorted(state)} vs {sorted(expected)}, shape mismatches {bad}"
            )
        self.projector.load_state_dict(state)
        if self.anyres is not None and newline is not None:
            with torch.no_grad():
                self.image_newline.copy_(newline)
        elif self.anyres is not None and not quiet:  # a Stage-1 (pad) projector: the newline starts here
            log.info("image_newline: new (randn / sqrt(hidden)), %s has none", file)
        if not quiet:  # a Stage-1 projector for a new run (from_pretrained says what it loads itself)
            log.info("loaded pretrained projector from %s", file)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, device: str | torch.device = "cpu", base_llm: str | None = None,
                        quantize: bool = True):
        """Load a saved model directory -> (model, tokenizer, saved config dict).

        A LoRA directory loads its base LLM from the path it names (or `base_llm`), then the adapter;
        `quantize=False` loads a QLoRA run's base in full precision (as merging does)."""

        model_dir = Path(model_dir)
        saved = json.loads((model_dir / CONFIG_FILE).read_text())
        cfg: ModelConfig = from_dict(ModelConfig, saved["model"], where="model")
        if not (model_dir / VISION_FILE).exists() and not (model_dir / LLM_DIR).exists():
            return cls._from_projector_dir(model_dir, cfg, saved, device)
        cfg.vision.pretrained = None  # weights come from this directory
        if cfg.vision.model_config_file:
            cfg.vision.model_config_file = str(model_dir / "vision_arch" / arch_file_name(cfg.vision))
        if cfg.lora is None:
            cfg.llm.path, cfg.llm.config = str(model_dir / LLM_DIR), None
        else:
            cfg.llm.path, cfg.llm.config = base_llm or cfg.llm.path, None
            if not cfg.llm.path or not Path(cfg.llm.path).exists():
                raise FileNotFoundError(f"{model_dir} holds LoRA adapters for the base LLM {cfg.llm.path!r}, which "
                                        f"is not there: pass its location (base_llm= / --base)")
            if not quantize:
                cfg.lora.quantize = None
        with weights_loaded_afterwards(f"from {model_dir / VISION_FILE}"):
            model = cls(cfg)
        if cfg.lora is not None:
            model.llm = load_lora(model.llm, str(model_dir / LLM_DIR))
        model.vision_tower.load_state_dict(load_file(str(model_dir / VISION_FILE)))
        model.load_projector(model_dir, quiet=True)
        log.info("loaded the trained model in %s (vision tower, projector, %s)", model_dir,
                 "LoRA adapters on the base LLM " + cfg.llm.path if cfg.lora is not None else "LLM")
        tokenizer = load_tokenizer(str(model_dir / LLM_DIR), use_fast=cfg.tokenizer_use_fast)
        return model.to_device(device).eval(), tokenizer, saved

    @classmethod
    def _from_projector_dir(cls, model_dir: Path, cfg: ModelConfig, saved: dict, device):
        """A projector-only directory (a Stage-1 run: its tower and LLM were frozen, so only the projector was
        saved): the tower and the LLM come back from where the run read them, the projector from here. Used to
        look at what Stage 1 taught (captioning with the frozen LLM)."""
        def gone(path: str) -> bool:  # a local path that is not there (one "/" and not here: a hub id, org/name)
            return not Path(path).exists() and (path[0] in "/.~" or path.count("/") != 1)

        missing = []
        if not cfg.llm.path:
            missing.append("its LLM was random-init from model.llm.config and never saved")
        elif gone(cfg.llm.path):
            missing.append(f"its LLM {cfg.llm.path} is not there")
        tokenizer_dir = cfg.tokenizer or cfg.llm.path
        if cfg.tokenizer and gone(cfg.tokenizer):
            missing.append(f"its tokenizer {cfg.tokenizer} is not there")
        if not cfg.vision.pretrained:
            missing.append("its vision tower was random-init and never saved")
        elif Path(cfg.vision.pretrained).suffix and not Path(cfg.vision.pretrained).exists():
            missing.append(f"its vision tower weights {cfg.vision.pretrained} are not there")
        if missing:
            raise FileNotFoundError(f"{model_dir} holds a projector only (train.save_full_model=false), and "
                                    f"{'; '.join(missing)} (paths are as the run saw them, relative to its working "
                                    f"directory): train with train.save_full_model=true to get a loadable model")
        model = cls(cfg)
        model.load_projector(model_dir, quiet=True)
        log.info("loaded the projector in %s on the run's frozen LLM %s and tower %s", model_dir, cfg.llm.path,
                 cfg.vision.pretrained)
        tokenizer = load_tokenizer(tokenizer_dir, use_fast=cfg.tokenizer_use_fast)
        return model.to_device(device).eval(), tokenizer, saved

    def to_device(self, device: str | torch.device) -> "LlavaModel":
        """`.to(device)`, except that a 4-bit LLM already sits where it was loaded."""
        if not self.quantized:
            return self.to(device)
        self.vision_tower.to(device)
        self.projector.to(device)
        return self


def arch_file_name(vision: VisionConfig) -> str:
    """File name of the vision architecture copied into a model directory (open_clip needs `<model>.json`)."""
    return f"{Path(vision.model).name}.json"


def _sub_state(state_dict: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def numel(p: torch.Tensor) -> int:
    """Number of elements, also of a parameter partitioned by ZeRO-3 (whose local tensor is empty)."""
    return int(getattr(p, "ds_numel", p.numel()))


def features_unused(images) -> bool:
    return images is None or images.shape[0] == 0
