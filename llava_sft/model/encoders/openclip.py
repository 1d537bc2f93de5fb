"""open_clip CLIP ViT (ViT-L/14 at 224 px, ViT-L/14-336 for LLaVA-1.5); only the image tower is kept.

`locate_pretrained` / `pretrained_problem` find out, without any network access, whether `vision.pretrained` can be
loaded from local disk (also used by `python -m llava_sft.envcheck` before a launch): offline, open_clip would
otherwise retry the hub for about a minute and then fail with an error that does not name the setting.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from llava_sft.model.vision import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    VisionConfig,
    VisionTower,
    weights_description,
)

log = logging.getLogger(__name__)

# The fix, as the recipes spell the settings (configs/llava_v1*/: pretrained: ${LLAVA_CLIP_WEIGHTS:-openai},
# cache_dir: ${LLAVA_CLIP_CACHE:-}).
WEIGHTS_FIX = ("set LLAVA_CLIP_WEIGHTS=/path/to/file (model.vision.pretrained), or LLAVA_CLIP_CACHE=/dir "
               "(model.vision.cache_dir) pre-filled with the weights")


def hub_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE as huggingface_hub interprets them, read now (the library reads them
    only once, at import)."""
    return any(os.environ.get(v, "").strip().upper() in ("1", "ON", "YES", "TRUE")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


@dataclass
class WeightsLookup:
    kind: str  # "none" (random init, or a hf-hub:/local-dir: model name: open_clip ignores `pretrained`),
    #            "file" (not an open_clip tag: a local weights file), "tag" (an open_clip pretrained tag)
    path: str | None = None  # the local file open_clip would load; None = not on this machine
    looked_in: str = ""  # where a tag's file was looked for (for the message)


def locate_pretrained(cfg: VisionConfig) -> WeightsLookup:
    """Where open_clip 3.2 would read `cfg.pretrained` from, looking only at local disk (mirrors
    open_clip.factory.create_model + open_clip.pretrained.download_pretrained)."""
    pretrained = cfg.pretrained or None
    if not pretrained or cfg.model.startswith(("hf-hub:", "local-dir:")):
        return WeightsLookup("none")
    if Path(pretrained).is_file():  # before importing open_clip (seconds): a file is what a local path means
        return WeightsLookup("file", pretrained)
    import open_clip

    tag_cfg = open_clip.get_pretrained_cfg(cfg.model.replace("/", "-"), pretrained)
    if not tag_cfg:
        return WeightsLookup("file")  # neither a tag of this model nor an existing file
    if "file" in tag_cfg:
        return WeightsLookup("tag", tag_cfg["file"] if os.path.isfile(tag_cfg["file"]) else None, tag_cfg["file"])
    hf_hub, url = tag_cfg.get("hf_hub", ""), tag_cfg.get("url", "")
    if hf_hub and open_clip.pretrained.has_hf_hub():  # open_clip prefers the HF hub and then ignores the url
        from huggingface_hub import constants, try_to_load_from_cache

        # 'org/name/' = the default weights file; 'org/name/file.bin' = that file. A .safetensors alternative is
        # tried first (open_clip.pretrained.download_pretrained_from_hf).
        repo_id, filename = os.path.split(hf_hub)
        filename = filename or open_clip.constants.HF_WEIGHTS_NAME
        safe = getattr(open_clip.pretrained, "_get_safe_alternatives", lambda name: ())
        names = [*safe(filename), filename]
        for name in names:
            hit = try_to_load_from_cache(repo_id, name, cache_dir=cfg.cache_dir or None)
            if isinstance(hit, str):  # else None (unknown) or _CACHED_NO_EXIST
                return WeightsLookup("tag", hit)
        where = f"{repo_id}/{' or '.join(names)} in the HF cache {cfg.cache_dir or constants.HF_HUB_CACHE}"
        return WeightsLookup("tag", None, where)
    if url:  # open_clip's own download cache: <cache_dir or ~/.cache/clip>/<basename of the url>
        target = os.path.join(cfg.cache_dir or os.path.expanduser("~/.cache/clip"), os.path.basename(url))
        return WeightsLookup("tag", target if os.path.isfile(target) else None, target)
    return WeightsLookup("tag", None, "nowhere (the tag has no download source)")


def pretrained_problem(cfg: VisionConfig, lookup: WeightsLookup | None = None) -> tuple[str, str] | None:
    """("error" | "warning", one-line message with the fix) when `cfg.pretrained` is not on local disk; else None."""
    lookup = lookup or locate_pretrained(cfg)
    what = f"model.vision.pretrained={cfg.pretrained!r} (open_clip {cfg.model})"
    if lookup.kind == "file" and lookup.path is None:
        import open_clip

        tags = ", ".join(open_clip.list_pretrained_tags_by_model(cfg.model.replace("/", "-"))) or "none"
        return "error", (f"{what}: weights file not found, and not an open_clip tag of this model (tags: {tags}): "
                         f"{WEIGHTS_FIX}")
    if lookup.kind == "tag" and lookup.path is None:
        if hub_offline():
            return "error", (f"{what} is not in the local cache (looked for {lookup.looked_in}) and the hub is "
                             f"offline (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE): {WEIGHTS_FIX}")
        return "warning", (f"{what} is not in the local cache (looked for {lookup.looked_in}): it will be downloaded "
                           "from the hub at start-up; an offline cluster needs LLAVA_CLIP_WEIGHTS=/path/to/file or "
                           "a pre-filled LLAVA_CLIP_CACHE")
    return None


class _OpenClipChatter(logging.Filter):
    """open_clip logs on the root logger: its model-building steps at INFO (six lines, among them "No potential
    checkpoint path found") and, whenever `pretrained` is None, a warning "... Model initialized randomly" -- also
    when a trained model's tower is built only to receive its saved weights a moment later
    (LlavaModel.from_pretrained), where it is false. Our own log line says where the weights come from."""

    def __init__(self, pretrained):
        super().__init__()
        self.pretrained = pretrained

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return False
        return bool(self.pretrained) or "Model initialized randomly" not in record.getMessage()


@contextlib.contextmanager
def _without_open_clip_chatter(pretrained):
    root, drop = logging.getLogger(), _OpenClipChatter(pretrained)
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


class OpenClipVisionTower(VisionTower):
    def __init__(self, cfg: VisionConfig):
        super().__init__(cfg)
        import open_clip

        if cfg.model_config_file:
            open_clip.add_model_config(Path(cfg.model_config_file))
        pretrained = cfg.pretrained or None
        lookup = locate_pretrained(cfg)
        problem = pretrained_problem(cfg, lookup)
        if problem and problem[0] == "error":  # missing file, or offline and not cached: fail now, not after retries
            raise FileNotFoundError(problem[1])
        try:
            with _without_open_clip_chatter(pretrained):
                clip = open_clip.create_model(
                    cfg.model, pretrained=pretrained, force_quick_gelu=cfg.quick_gelu,
                    cache_dir=cfg.cache_dir or None, require_pretrained=bool(pretrained), **(cfg.model_kwargs or {}),
                )
        except Exception as e:
            if lookup.kind != "tag":
                raise
            # open_clip's message names neither the setting nor the fix (typically a hub download failure)
            first = (str(e).splitlines() or [""])[0][:300]
            raise RuntimeError(f"model.vision.pretrained={pretrained!r} (open_clip {cfg.model}): the weights could "
                               f"not be loaded ({type(e).__name__}: {first}): {WEIGHTS_FIX}") from e
        self.visual = clip.visual
        del clip  # the text tower is never used
        depth = len(self.visual.transformer.resblocks)
        self.block_index = self.check_select_layer(depth)  # index of the transformer block whose output we read
        self.hidden_size = self.visual.transformer.width
        grid = self.visual.grid_size
        self.num_patches = grid[0] * grid[1]
        size = self.visual.image_size
        self.image_size = size[0] if isinstance(size, (tuple, list)) else size
        mean, std = getattr(self.visual, "image_mean", None), getattr(self.visual, "image_std", None)
        self.image_mean, self.image_std = tuple(mean or OPENAI_CLIP_MEAN), tuple(std or OPENAI_CLIP_STD)
        log.info(
            "vision tower %s (weights: %s, quick_gelu=%s): %d px, %d patches, width %d, features of block %d/%d",
            cfg.model, weights_description(pretrained),
            cfg.quick_gelu, self.image_size, self.num_patches, self.hidden_size, self.block_index + 1, depth,
        )

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.visual.forward_intermediates(
            pixels.to(self.visual.conv1.weight.dtype), indices=[self.block_index], stop_early=True,
            intermediates_only=True, output_fmt="NLC", output_extra_tokens=True,
        )
        patches = out["image_intermediates"][0]
        if self.cfg.select_feature == "cls_patch":
            patches = torch.cat([out["image_intermediates_prefix"][0], patches], dim=1)
        return patches
