"""Preflight's sizing of what pre-emption and the batch geometry need: the checkpoint's size and write time against
the notice a cluster gives, and a suggested micro-batch that the config check accepts."""
from __future__ import annotations

from pathlib import Path

import pytest

from llava_sft.config import load_config
from llava_sft.preflight import sizing, twin
from llava_sft.preflight.rehearse import notice_check

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "configs" / "llava_v1_5").glob("*.yaml")) + sorted((REPO / "configs" / "llava_v1").glob("*.yaml"))
ZERO = {"zero2.json": 2, "zero3.json": 3, "zero3_offload.json": 3}


def sized(path: Path, num_gpus: int, overrides: tuple[str, ...] = (), **kw) -> dict:
    # Stage 3 starts from a Stage-2 output directory, not on this machine: its LLM has Vicuna-7B's shape
    stage3 = ("model.llm.path=lmsys/vicuna-7b-v1.5",) if "stage3" in Path(path).name else ()
    cfg = load_config(path, [*stage3, *overrides])
    real, _ = twin.real_llm_config(cfg.model.llm.path)
    stage = ZERO[Path(cfg.train.deepspeed).name] if cfg.train.deepspeed else None
    return sizing.size(cfg, real, twin.real_vision_shape(cfg.model.vision), stage, True, num_gpus, 0.4, None, **kw)


def test_a_7b_stage2_checkpoint_is_95_gb_and_does_not_fit_sigterms_30_s():
    s = sized(REPO / "configs/llava_v1_5/stage2_finetune_7b.yaml", 8)
    # Vicuna-7B (Llama-2-7B: 6,738,415,616 parameters) + the 2-layer MLP projector 1024 -> 4096, each with a bf16
    # weight, an fp32 master and AdamW's two fp32 moments: 14 bytes a parameter
    trainable = 6_738_415_616 + (1024 * 4096 + 4096 + 4096 * 4096 + 4096)
    assert s["checkpoint_gb"] == round(trainable * 14 / 1e9, 2) == 94.63
    # ZeRO-3 on one 8-GPU node: every rank writes its shard, the node at 1 GB/s (the default assumption)
    assert s["checkpoint_seconds"] == pytest.approx(94.6, abs=0.1)
    assert notice_check(s, "A100-80GB", 30).status == "WARN"
    assert notice_check(s, "A100-80GB", 600).status == "PASS"
    two_nodes = sized(REPO / "configs/llava_v1_5/stage2_finetune_7b.yaml", 16)
    assert two_nodes["checkpoint_seconds"] == pytest.approx(s["checkpoint_seconds"] / 2, abs=0.1)


def test_stage1_checkpoints_only_the_projector_and_fits_any_notice():
    s = sized(REPO / "configs/llava_v1_5/stage1_pretrain_7b.yaml", 8)
    assert s["checkpoint_gb"] == round((1024 * 4096 + 4096 + 4096 * 4096 + 4096) * 14 / 1e9, 2)
    assert notice_check(s, "A100-80GB", 30).status == "PASS"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
@pytest.mark.parametrize("num_gpus", [1, 2, 4, 8, 16])
def test_the_suggested_micro_batch_splits_the_global_batch(path, num_gpus):
    """README once advised a micro-batch of 10 on 4 x 40 GB, which the config check refuses (128 is not a multiple of
    4 x 10): every suggestion must give whole accumulation steps."""
    cfg = load_config(path)
    for gpu, g in sized(path, num_gpus)["gpus"].items():
        m = g["largest_micro_batch_that_fits"]
        assert m == 0 or cfg.train.global_batch_size % (num_gpus * m) == 0, (gpu, m)


def test_full_stage2_on_four_40_gb_gpus_takes_micro_batch_8():
    """The README's advice, from this arithmetic: 128 = 4 GPUs x 8 x 4 accumulation steps."""
    g = sized(REPO / "configs/llava_v1_5/stage2_finetune_7b.yaml", 4)["gpus"]["A100-40GB"]
    assert not g["fits"] and g["largest_micro_batch_that_fits"] == 8


def test_dpo_sizing_counts_both_sides_and_the_reference():
    """A pair is two sequences: the activations of micro-batch 1 are those of two SFT samples; a frozen copy adds
    its 16-bit weights (LLM + projector) on every GPU under ZeRO-2; a precomputed reference adds no memory but a
    forward pass over the data before step 1."""
    path = REPO / "configs/llava_v1_5/stage3_dpo_7b.yaml"
    dpo = sized(path, 8)
    sft = sized(path, 8, ("dpo=null",))
    assert dpo["states_gib"] == sft["states_gib"] and dpo["reference_gib"] == 0
    two = sized(path, 8, ("dpo=null", "train.micro_batch_size=2"))  # two SFT samples per micro-batch
    assert dpo["activations_gib"] == two["activations_gib"] > sft["activations_gib"]
    assert set(dpo["reference_pass_hours"]) == set(dpo["gpus"]) and "reference_pass_hours" not in sft
    # RLAIF-V's run: max_steps 2672 of 8 pairs, both sides counted
    per_step = {k: s["seconds_per_step"]["H100-80GB"] for k, s in (("dpo", dpo), ("sft", sft))}
    assert dpo["steps"] == sft["steps"] == 2672 and per_step["dpo"] == pytest.approx(2 * per_step["sft"], abs=0.02)
    copy = sized(path, 8, ("dpo.reference=copy",))
    params = copy["llm_params"] + copy["projector_params"]
    assert copy["reference_gib"] == pytest.approx(params * 2 / 2**30, abs=0.005)
    assert copy["gpus"]["H100-80GB"]["peak_gib"] == pytest.approx(dpo["gpus"]["H100-80GB"]["peak_gib"]
                                                                 + copy["reference_gib"], abs=0.11)
