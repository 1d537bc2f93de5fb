"""The demo's base models, pretrained from its generated data (never downloaded), then used exactly as the paper
recipes use Vicuna and CLIP: loaded from a directory / a weights file, the tower frozen in both stages, the LLM
frozen in Stage 1.

  * LLM: a tiny Llama pretrained by next-token prediction on plain prose about the shapes world
    (`data_prep.make_shapes --n-prose`: scene descriptions, facts about colours, shapes, counts and positions; no
    chat format). Written with `save_pretrained` and the demo tokenizer to OUT/llm.
  * Vision tower: a tiny open_clip CLIP (the `--arch` JSON: the ViT the demo uses + a small text tower) pretrained
    with open_clip's contrastive loss on the Stage-1 image-caption pairs, the images preprocessed as training
    will. Its open_clip state dict is OUT/clip.pt, what `model.vision.pretrained` names.

OUT/base.json records the inputs (file hashes) and settings; a second run with the same ones reuses both models.

    python -m data_prep.pretrain_base --data data/demo --tokenizer data/demo/tokenizer --out checkpoints/demo/base
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import random
import time
from pathlib import Path

import torch

log = logging.getLogger("pretrain_base")

# The demo's LLM (configs/demo/base_stage*.yaml read it from OUT/llm): 3 layers, width 128. 3 layers instead of 4
# (until 2026-12-02) make every LLM step 10-25 % cheaper, which pays for Stage 2's 10 epochs: with them the demo
# reached 0.933 / 0.947 / 0.920 at seeds 0 / 1 / 2 (0.937 / 0.923 / 0.960 with the tower at batch 128, below)
# where 4 layers and 8 epochs gave 0.893 / 0.953 / 0.917 (benchmarks/RESULTS.md, fourteenth session).
LLM_CONFIG = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 3,
              "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 512,
              "tie_word_embeddings": False}
DEFAULT_POS_STD = 0.5  # a learnable position embedding's initial std (see --clip-steps below for the measurement)


def _digest(*paths: Path) -> str:
    h = hashlib.sha256()
    for path in paths:
        for file in sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file()):
            h.update(file.name.encode())
            h.update(file.read_bytes())
    return h.hexdigest()[:16]


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def pretrain_llm(prose: list[str], tokenizer_dir: Path, out_dir: Path, steps: int, batch: int, seq_len: int,
                 lr: float, seed: int, config: dict | None = None) -> list[float]:
    """Next-token prediction on the prose (each line BOS + text + EOS, concatenated, cut into seq_len blocks);
    returns the loss of every step."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from llava_sft.data.sentencepiece_llama import save_tokenizer
    from llava_sft.data.tokenize import tokenize_with_images
    from llava_sft.model.llava import load_tokenizer, save_llm

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = load_tokenizer(str(tokenizer_dir))
    ids: list[int] = []
    for line in prose:  # as training tokenizes (data/tokenize.py): the slow tokenizer's ids, 2x faster
        ids += tokenize_with_images(line, tokenizer) + [tokenizer.eos_token_id]
    blocks = torch.tensor(ids[: len(ids) // seq_len * seq_len]).view(-1, seq_len)
    if len(blocks) < batch:
        raise ValueError(f"{len(ids)} prose tokens make {len(blocks)} blocks of {seq_len}, fewer than a batch of "
                         f"{batch}: generate more prose (--n-prose) or lower --lm-batch")
    fields = dict(config or LLM_CONFIG)
    hf_config = AutoConfig.for_model(fields.pop("model_type"), vocab_size=len(tokenizer), **fields)
    model = AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa")
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _cosine(s, steps, max(1, steps // 20)))
    order: list[int] = []
    losses = []
    for step in range(steps):
        if len(order) < batch:
            order += rng.sample(range(len(blocks)), len(blocks))
        take, order = order[:batch], order[batch:]
        x = blocks[take]
        loss = model(input_ids=x, labels=x).loss
        losses.append(loss.item())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            log.info("LLM step %d/%d: loss %.4f", step + 1, steps, loss.item())
    model.eval()
    save_llm(model, out_dir)
    save_tokenizer(tokenizer, out_dir)
    return losses


def pretrain_clip(pairs: list[tuple[Path, str]], arch_file: Path, out_file: Path, steps: int, batch: int,
                  lr: float, seed: int, pos_std: float | None = None,
                  negatives: list[str] | None = None) -> list[float]:
    """open_clip's contrastive loss on (image, caption) pairs, the images as the demo's training reads them;
    returns the loss of every step. `pos_std`: initialise a learnable position embedding at this standard
    deviation instead of open_clip's width**-0.5 (0.09 for the demo's width 128), the experiment of
    benchmarks/RESULTS.md (fifth session) on how much of a patch feature says where it is.
    `negatives`: one hard-negative caption per pair (make_shapes.moved_caption), added as NegCLIP does: each
    image is scored against the batch's captions and their negatives, each caption against the batch's images."""
    import open_clip
    from PIL import Image

    from llava_sft.data.images import ImageProcessor
    from llava_sft.model.vision import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    torch.manual_seed(seed)
    rng = random.Random(seed)
    open_clip.add_model_config(arch_file)
    name = arch_file.stem
    model = open_clip.create_model(name, force_quick_gelu=True)
    if pos_std is not None:
        pos = model.visual.positional_embedding
        if not pos.requires_grad:
            raise ValueError(f"--clip-pos-std needs a learnable position embedding, but {arch_file} sets "
                             f"vision_cfg.pos_embed_type to a fixed one: use \"learnable\" or drop --clip-pos-std")
        with torch.no_grad():
            pos.normal_(0.0, pos_std)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    processor = ImageProcessor(size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, "pad")
    images = torch.stack([processor(Image.open(path).convert("RGB")) for path, _ in pairs])
    tokenize = open_clip.get_tokenizer(name)
    texts = tokenize([caption for _, caption in pairs])
    if negatives is not None and len(negatives) != len(pairs):
        raise ValueError(f"{len(negatives)} negative captions for {len(pairs)} pairs: give one per pair")
    negative_texts = tokenize(negatives) if negatives is not None else None
    loss_fn = open_clip.loss.ClipLoss()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _cosine(s, steps, max(1, steps // 20)))
    losses = []
    for step in range(steps):
        take = torch.tensor(rng.sample(range(len(pairs)), min(batch, len(pairs))))
        image_features, text_features, logit_scale = model(images[take], texts[take])[:3]
        if negative_texts is None:
            loss = loss_fn(image_features, text_features, logit_scale)
        else:
            negative_features = model.encode_text(negative_texts[take], normalize=True)
            target = torch.arange(len(take))
            per_image = logit_scale * image_features @ torch.cat([text_features, negative_features]).T
            per_text = logit_scale * text_features @ image_features.T
            loss = (torch.nn.functional.cross_entropy(per_image, target)
                    + torch.nn.functional.cross_entropy(per_text, target)) / 2
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            log.info("CLIP step %d/%d: loss %.4f", step + 1, steps, loss.item())
    out_file.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out_file)
    return losses


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="make_shapes output (prose.txt, stage1.json, images/)")
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--arch", type=Path, default=Path("configs/demo/tiny-clip.json"), help="open_clip CLIP JSON")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    # 1,200 steps of 16 blocks at lr 3e-3 (was 600 of 32 at 6e-3, the same tokens): Stage 2 on the 600-step base
    # converged on one CPU and not on another (0.87 vs 0.62 at seed 0); on bases pretrained longer it converges on
    # every base and seed measured (final loss 0.10-0.14). Batch 16 costs 160 s against 276 s for batch 32 on a
    # 2-core EPYC, and Stage 2 on it did as well (benchmarks/RESULTS.md, 2026-12-01); on the 2-core Xeon the time per
    # token is the same at 16, 32 and 64 (fourteenth session).
    ap.add_argument("--lm-steps", type=int, default=1200)
    ap.add_argument("--lm-batch", type=int, default=16)
    ap.add_argument("--lm-seq-len", type=int, default=128)
    ap.add_argument("--lm-lr", type=float, default=3e-3)
    # 400 steps with a learnable position embedding initialised at std 0.5 (configs/demo/tiny-clip.json): on it the
    # demo reached 0.917/0.967/0.927 at seeds 0/1/2 (eleventh session) and 0.893/0.953/0.917 through the shipped
    # script (twelfth); with the fixed sin-cos embedding and 200 steps (until 2026-12-01) no recipe got position
    # questions past 0.68, and std 0.25 did worse than 0.5 (benchmarks/RESULTS.md)
    ap.add_argument("--clip-steps", type=int, default=400)
    # batch 128 (256 until 2026-12-02): 56 s against 99 s for the 400 steps, the loss through its plateau as at 256
    # (0.13 at the end, of chance 4.85); Stage 2 on it 0.937 / 0.923 / 0.960 (benchmarks/RESULTS.md, fourteenth)
    ap.add_argument("--clip-batch", type=int, default=128)
    ap.add_argument("--clip-lr", type=float, default=1e-3)  # 2e-2 collapsed to chance at batch 32 (measured)
    ap.add_argument("--clip-pos-std", type=float, default=None,
                    help="initialise the tower's learnable position embedding at this std (open_clip: width**-0.5); "
                         f"default {DEFAULT_POS_STD} for a learnable one, none for a fixed one")
    ap.add_argument("--clip-hard-negatives", action="store_true",
                    help="add one moved-objects caption per pair as a hard negative (NegCLIP), so the tower must "
                         "encode where each object is")
    args = ap.parse_args(argv)
    # our progress at INFO; open_clip's model-building chatter (INFO on the root logger) stays out
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    prose_file, stage1_file = args.data / "prose.txt", args.data / "stage1.json"
    if not prose_file.is_file():
        raise SystemExit(f"{prose_file} is missing: generate it with python -m data_prep.make_shapes ... --n-prose N")
    # the inputs count by content (digested below), not by where they lie: a moved data directory is reused
    pos_std = args.clip_pos_std
    if pos_std is None and json.loads(args.arch.read_text())["vision_cfg"].get("pos_embed_type") == "learnable":
        pos_std = DEFAULT_POS_STD
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "data", "tokenizer", "arch")}
    settings["clip_pos_std"] = pos_std  # the std used, default included: a changed default rebuilds the cache
    record = {"settings": settings, "llm_config": LLM_CONFIG,
              "inputs": _digest(prose_file, stage1_file, args.tokenizer, args.arch)}
    stamp = args.out / "base.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == record and (args.out / "clip.pt").is_file():
        print(f"base models in {args.out} are up to date (same inputs and settings): reused")
        return
    start = time.time()
    stamp.unlink(missing_ok=True)
    lm_losses = pretrain_llm(prose_file.read_text().splitlines(), args.tokenizer, args.out / "llm", args.lm_steps,
                             args.lm_batch, args.lm_seq_len, args.lm_lr, args.seed)
    records = json.loads(stage1_file.read_text())
    pairs = [(args.data / "images" / r["image"], r["conversations"][1]["value"]) for r in records]
    negatives = None
    if args.clip_hard_negatives:
        from data_prep.make_shapes import moved_caption

        meta = {m["image"]: m["shapes"] for m in map(json.loads, (args.data / "meta.jsonl").read_text().splitlines())}
        rng = random.Random(f"{args.seed}-negatives")
        negatives = [moved_caption(rng, meta[r["image"]]) for r in records]
    clip_losses = pretrain_clip(pairs, args.arch, args.out / "clip.pt", args.clip_steps, args.clip_batch,
                                args.clip_lr, args.seed, pos_std, negatives)
    (args.out / "losses.json").write_text(json.dumps({"llm": lm_losses, "clip": clip_losses}) + "\n")
    stamp.write_text(json.dumps(record, indent=1) + "\n")
    print(f"base models written to {args.out} in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
