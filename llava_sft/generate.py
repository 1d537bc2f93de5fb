"""Answer questions about images with a saved model, using its saved template and preprocessing.

    python -m llava_sft.generate --model checkpoints/demo/stage2 --image IMG.png --prompt "What color is the circle?"

Prints the answer as the last line. Greedy by default; `--temperature > 0` samples (with `--top-p`).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from PIL import Image

from llava_sft.constants import IMAGE_PLACEHOLDER
from llava_sft.data.images import ImageProcessor
from llava_sft.data.templates import ChatTemplate, get_template
from llava_sft.data.tokenize import tokenize_prompt
from llava_sft.model.llava import LlavaModel

log = logging.getLogger(__name__)


def stop_token_ids(tokenizer, template: ChatTemplate) -> list[int]:
    """EOS plus every stop string of the template that is one token of this tokenizer."""
    ids = {tokenizer.eos_token_id}
    for text in template.stop_strings:
        token = tokenizer.convert_tokens_to_ids(text)
        if token is not None and token != tokenizer.unk_token_id:
            ids.add(token)
        else:  # not a single token: generation stops only at EOS or max_new_tokens
            log.warning("stop string %r of template %r is not one token of this tokenizer; stopping at EOS only",
                        text, template.name)
    return sorted(i for i in ids if i is not None)


class Answerer:
    """Batched question answering with KV-cached HF generation (left padding)."""

    def __init__(self, model_dir: str | Path, device: str = "auto", template: str | None = None):
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model, self.tokenizer, saved = LlavaModel.from_pretrained(model_dir, device=self.device)
        self.processor = ImageProcessor.from_saved(saved["image"])
        self.template = get_template(template or saved.get("template") or saved["model"]["template"],
                                     saved["model"].get("system_prompt"), tokenizer=self.tokenizer)
        self.stop_ids = stop_token_ids(self.tokenizer, self.template)
        self.model_id = Path(model_dir).name

    def prompt_for(self, question: str, with_image: bool = True) -> str:
        if with_image and IMAGE_PLACEHOLDER not in question:
            question = IMAGE_PLACEHOLDER + "\n" + question
        return self.template.generation_prompt(question)

    @torch.no_grad()
    def answer(self, questions: list[str], images: list[Image.Image | None], max_new_tokens: int = 128,
               temperature: float = 0.0, top_p: float | None = None, seed: int | None = None) -> list[str]:
        prompts = [self.prompt_for(q, img is not None) for q, img in zip(questions, images, strict=True)]
        token_lists = [tokenize_prompt(p, self.tokenizer) for p in prompts]
        length = max(len(t) for t in token_lists)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(prompts), length), pad, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for row, tokens in enumerate(token_lists):  # left padding
            input_ids[row, length - len(tokens):] = torch.tensor(tokens)
            attention[row, length - len(tokens):] = 1
        tiled = [self.processor.tiles(img) for img in images if img is not None]  # AnyRes: several tiles each
        pixels = torch.cat([t for t, _, _ in tiled]).to(self.device) if tiled else None
        gen = {"max_new_tokens": max_new_tokens, "eos_token_id": self.stop_ids, "pad_token_id": pad}
        if temperature > 0:
            if seed is not None:
                torch.manual_seed(seed)
            gen.update(do_sample=True, temperature=temperature, top_p=top_p)
        else:
            gen.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        out = self.model.generate(input_ids.to(self.device), attention.to(self.device), pixels,
                                  image_sizes=[size for _, size, _ in tiled], **gen)
        return [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in out]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="saved model directory (Stage-2 output; a Stage-1 projector "
                    "directory loads on the LLM and tower its run read)")
    ap.add_argument("--image", help="image file (omit for a text-only question)")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=None)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    answerer = Answerer(args.model, args.device)
    image = Image.open(args.image).convert("RGB") if args.image else None
    answer = answerer.answer([args.prompt], [image], args.max_new_tokens, args.temperature, args.top_p, args.seed)[0]
    print(answer)


if __name__ == "__main__":
    main()
