"""Tiny real models and data for tests: an open_clip ViT (32 px, 16 patches), a 2-layer Llama."""
from __future__ import annotations

from pathlib import Path

from llava_sft.config import RunConfig, from_dict

TEST_VIT = str(Path(__file__).parent / "assets" / "test-vit.json")

TINY_LLAMA = {
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}


def model_dict(tokenizer_dir, projector: str = "mlp2x_gelu", hidden: int = 64) -> dict:
    return {
        "vision": {"name": "openclip", "model": "test-vit", "model_config_file": TEST_VIT, "pretrained": None},
        "projector": projector,
        "llm": {"config": dict(TINY_LLAMA, hidden_size=hidden)},
        "tokenizer": str(tokenizer_dir),
        "image_aspect": "pad",
    }


def run_config(tokenizer_dir, data_dir, out_dir, stage: int, **train) -> RunConfig:
    """A Stage-1 or Stage-2 config on the shapes data (only the config differs between stages)."""
    data_dir = Path(data_dir)
    stage_train = (
        {"train_projector": True, "train_llm": False, "lr": 1e-3}
        if stage == 1 else {"train_projector": True, "train_llm": True, "lr": 1e-3, "save_full_model": True}
    )
    return from_dict(RunConfig, {
        "run_name": f"test-stage{stage}",
        "model": model_dict(tokenizer_dir),
        "data": {"path": str(data_dir / ("stage1.json" if stage == 1 else "stage2.json")),
                 "image_folder": str(data_dir / "images"), "template": "plain" if stage == 1 else "vicuna_v1",
                 "max_length": 256, "num_workers": 0},
        "train": {"output_dir": str(out_dir), "global_batch_size": 8, "micro_batch_size": 4, "max_steps": 3,
                  "warmup_ratio": 0.0, "seed": 0, **stage_train, **train},
    })


def forward_passes(cfg: RunConfig, world: int, steps: int) -> list[list[int]]:
    """With data.packing: how many packed micro-batches (forward passes) each rank runs in each of the first
    `steps` steps of epoch 0, computed from the data as the trainer plans it."""
    import torch

    from llava_sft.train.trainer import build, make_collator, make_plan

    _, tokenizer, dataset = build(cfg, torch.device("cpu"))
    collate = make_collator(cfg, tokenizer, dataset.tokens_per_image)
    counts = []
    for step in range(steps):
        per_rank = []
        for rank in range(world):
            plan = make_plan(cfg, dataset, world, rank)
            [share] = plan.micro_batches(plan.global_batches(0)[step])
            per_rank.append(len(collate([dataset[i] for i in share])))
        counts.append(per_rank)
    return counts


def sample_dict(ids: list[int], n_images: int, prompt_len: int, seed: int, image_size: int = 32) -> dict:
    """A sample as the dataset gives it (ids with IMAGE_TOKEN_INDEX placeholders, labels masked over the first
    `prompt_len` ids and the placeholders, `n_images` random images of the test ViT's size)."""
    import torch

    from llava_sft.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX

    ids = torch.tensor(ids)
    labels = ids.clone()
    labels[:prompt_len] = IGNORE_INDEX
    labels[ids == IMAGE_TOKEN_INDEX] = IGNORE_INDEX
    g = torch.Generator().manual_seed(seed)
    return {"id": str(seed), "input_ids": ids, "labels": labels, "truncated": False,
            "images": torch.randn(n_images, 3, image_size, image_size, generator=g)}
