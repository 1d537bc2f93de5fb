"""The CPU overhead of our training step against the plain library path, on the same model and batches.

    python benchmarks/overhead.py                  # tiny Stage-2 model, 10 timed steps each, interleaved
    python benchmarks/overhead.py --steps 20 --json overhead.json

Ours: `trainer.train_step` (splice_images, the supervised-only LM head and chunked loss, global-token
normalisation, non-finite guard, gradient clipping, AdamW, LR schedule, skip report). Plain: what a minimal
LLaVA loop does -- vision tower -> projector -> per-sample torch.cat of text embeddings and image features, right
padding -> `LlamaForCausalLM(inputs_embeds=..., labels=...)` (HF's own shift and mean cross-entropy over all
positions' logits) -> backward -> clip_grad_norm_ -> AdamW. Both start from the same weights, take the same
micro-batches (a Stage-2 shape: one image + `--seq-text` tokens, the second half of them supervised), and
alternate step by step, so that both see the same machine state. Reported: median seconds per step, the ratio
ours/plain (goal <= 1.10), and where the time goes in each (input assembly, forward+backward, optimizer).
`--full-logits` runs ours with the LM head at every position, as the plain path has it: the difference left is
the overhead of everything else.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llava_sft.config import TrainConfig  # noqa: E402
from llava_sft.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX  # noqa: E402
from llava_sft.data.dataset import SkipReport  # noqa: E402
from llava_sft.model.llava import LlavaModel, LLMConfig, ModelConfig  # noqa: E402
from llava_sft.model.vision import VisionConfig  # noqa: E402
from llava_sft.train.trainer import DDPEngine, param_groups, train_step  # noqa: E402


def make_micro(micro: int, seq_text: int, vocab: int, image_size: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (micro, seq_text), generator=g)
    ids[:, 0], ids[:, 1] = 1, IMAGE_TOKEN_INDEX
    labels = ids.clone()
    labels[:, : seq_text // 2] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids), "ids": list(range(micro)),
            "images": torch.randn(micro, 3, image_size, image_size, generator=g), "skipped": [], "truncated": 0}


def plain_step(model: LlavaModel, optimizer, micro: list[dict], clip: float, times: dict) -> None:
    """The library path, written as a minimal LLaVA loop would."""
    embed = model.llm.get_input_embeddings()
    for batch in micro:
        t0 = time.perf_counter()
        with torch.no_grad():
            feats = model.vision_tower(batch["images"])
        features = model.projector(feats)
        rows, targets = [], []
        for i in range(batch["input_ids"].shape[0]):
            ids, labels = batch["input_ids"][i], batch["labels"][i]
            at = int((ids == IMAGE_TOKEN_INDEX).nonzero()[0])
            rows.append(torch.cat([embed(ids[:at]), features[i], embed(ids[at + 1:])]))
            targets.append(torch.cat([labels[:at], torch.full((features.shape[1],), IGNORE_INDEX), labels[at + 1:]]))
        inputs = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
        labels = torch.nn.utils.rnn.pad_sequence(targets, batch_first=True, padding_value=IGNORE_INDEX)
        mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(r), dtype=torch.long) for r in rows], batch_first=True)
        t1 = time.perf_counter()
        out = model.llm(inputs_embeds=inputs, attention_mask=mask, labels=labels, use_cache=False)
        (out.loss / len(micro)).backward()
        times["forward_backward"] += time.perf_counter() - t1
        times["inputs"] += t1 - t0
    t2 = time.perf_counter()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    times["optimizer"] += time.perf_counter() - t2


def build(args) -> LlavaModel:
    vision = VisionConfig(model="tiny-vit", pretrained=None, model_config_file="configs/demo/tiny-vit.json")
    llm = LLMConfig(config={"model_type": "llama", "hidden_size": args.llm_hidden, "intermediate_size": args.llm_inter,
                            "num_hidden_layers": args.llm_layers, "num_attention_heads": 4, "num_key_value_heads": 4,
                            "vocab_size": args.vocab, "max_position_embeddings": 4096})
    torch.manual_seed(0)
    model = LlavaModel(ModelConfig(vision=vision, llm=llm))
    model.set_trainable(True, True)
    model.train()
    model.text_only_anchor = "none"  # one process, as the trainer sets it
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llm-hidden", type=int, default=256)
    ap.add_argument("--llm-layers", type=int, default=4)
    ap.add_argument("--llm-inter", type=int, default=704)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq-text", type=int, default=64)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--full-logits", action="store_true",
                    help="ours with the LM head at every position too: the overhead of everything else")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    ours_model, plain_model = build(args), build(args)
    plain_model.load_state_dict(ours_model.state_dict())
    ours_model.supervised_logits_only = not args.full_logits
    t_cfg = TrainConfig(lr=1e-5, grad_clip=1.0)
    ours_opt = torch.optim.AdamW(param_groups(ours_model, 0.0, 1e-5), lr=1e-5)
    ours_sched = torch.optim.lr_scheduler.LambdaLR(ours_opt, lambda step: 1.0)
    ours_engine = DDPEngine.local(ours_model, ours_opt, ours_sched, t_cfg)
    plain_opt = torch.optim.AdamW([p for p in plain_model.parameters() if p.requires_grad], lr=1e-5)
    size = ours_model.vision_tower.image_size
    ours_s, plain_s, plain_times = [], [], {"inputs": 0.0, "forward_backward": 0.0, "optimizer": 0.0}
    report = SkipReport()
    for step in range(args.steps + 1):  # step 0 warms both up
        micro = [make_micro(args.micro, args.seq_text, args.vocab, size, seed=step * 100 + k) for k in range(args.accum)]
        t0 = time.perf_counter()
        train_step(ours_engine, micro, torch.device("cpu"), False, report)
        t1 = time.perf_counter()
        plain_step(plain_model, plain_opt, micro, t_cfg.grad_clip, plain_times if step else dict(plain_times))
        t2 = time.perf_counter()
        if step:
            ours_s.append(t1 - t0)
            plain_s.append(t2 - t1)
    ours, plain = statistics.median(ours_s), statistics.median(plain_s)
    profile = profile_ours(ours_model, args, size)
    profile["optimizer_and_bookkeeping"] = round(ours - profile["inputs"] - profile["forward_backward"], 4)
    result = {"ours_logits": "all" if args.full_logits else "supervised", "ours_s_per_step": round(ours, 4), "plain_s_per_step": round(plain, 4), "ratio": round(ours / plain, 3),
              "plain_breakdown_s_per_step": {k: round(v / args.steps, 4) for k, v in plain_times.items()},
              "ours_breakdown_s_per_step": profile, "threads": torch.get_num_threads(),
              "shape": {k: getattr(args, k) for k in ("llm_hidden", "llm_layers", "vocab", "seq_text", "micro", "accum")}}
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


def profile_ours(model: LlavaModel, args, size: int) -> dict:
    """Our step's parts, timed the same way as the plain path's: input assembly (tower, projector, splice), forward +
    backward (decoder, LM head, loss), and the rest of `train_step` (bookkeeping, guard, clip, AdamW)."""
    from llava_sft.model.loss import loss_sum
    from llava_sft.model.packed_attention import llm_inputs

    micro = [make_micro(args.micro, args.seq_text, args.vocab, size, seed=10_000 + k) for k in range(args.accum)]
    inputs = forward_backward = 0.0
    for _ in range(3):
        for batch in micro:
            t0 = time.perf_counter()
            spliced = model.embed(batch["input_ids"], batch["attention_mask"], batch["images"], batch["labels"])
            kwargs, labels = llm_inputs(spliced, model.attn_implementation)
            t1 = time.perf_counter()
            loss, count = loss_sum(model.llm, kwargs, labels, model.supervised_logits_only)
            (loss / count).backward()
            forward_backward += time.perf_counter() - t1
            inputs += t1 - t0
        model.zero_grad(set_to_none=True)
    return {"inputs": round(inputs / 3, 4), "forward_backward": round(forward_backward / 3, 4)}


if __name__ == "__main__":
    main()
