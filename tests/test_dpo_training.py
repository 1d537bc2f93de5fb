"""Stage 3 (DPO) through the training core: the three references give the same losses, a run through the CLI
computes its reference once and reuses it, dropout is off, a pre-emption during the reference pass stops it, packed
equals padded, two ranks (DDP, ZeRO-2, ZeRO-3, FSDP2) equal one process, and a resumed run continues exactly -- the
LLM loaded from a directory, the demo world's preference pairs, the runs through `python -m llava_sft.train`
(torchrun for two ranks).

Tolerances: the same fp32 model and batches; what differs between the runs compared is only how the work is split
(one or two ranks, padded or packed rows, a precomputed number or the same forward pass run again), which changes
summation orders: ~1e-6 relative on a loss of ~0.7 after a few Adam steps (lr 1e-3 moves weights by ~1e-3 per step,
and a perturbation of 1e-7 in a gradient moves Adam's update by up to ~1e-7 / sqrt(v) ~ 1e-4 of it). rel 1e-4 as the
other engine tests (tests/test_anyres_training.py).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.make_preferences import generate as make_preferences
from data_prep.make_shapes import generate as make_shapes
from llava_sft.config import PreferenceConfig, save_config
from llava_sft.model.lora import LoraSettings
from llava_sft.train.trainer import train

pytestmark = pytest.mark.latest_stack  # passes on constraints/latest.txt too (CI runs it there)

REPO = Path(__file__).resolve().parents[1]
STATS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dpo_data")
    make_shapes(out, seed=11, image_size=32, n_stage1=4, n_stage2=24, n_eval=8, text_only_frac=0.2)
    make_preferences(out, n=32, n_eval=8, seed=0)
    pairs = json.loads((out / "preferences.json").read_text())  # and two text-only pairs
    pairs += [{"id": "text-1", "conversations": [{"from": "human", "value": "What is two plus two?"}],
               "chosen": "Four.", "rejected": "Five."},
              {"id": "text-2", "prompt": "Name a colour.", "chosen": "Red.", "rejected": "A circle."}]
    (out / "preferences.json").write_text(json.dumps(pairs))
    return out


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def dpo_config(tokenizer_dir, data: Path, tmp_path: Path, name: str, reference: str = "precomputed", **train_kw):
    """A 3-step DPO run from a saved LLM directory and projector (tests/test_deepspeed.py's Stage-2 start)."""
    from tests.test_deepspeed import stage2_from_pretrained

    steps = train_kw.pop("max_steps", 3)
    cfg = stage2_from_pretrained(tokenizer_dir, data, tmp_path, name, **{"lr": 1e-3, "global_batch_size": 8,
                                                                         "micro_batch_size": 2, **train_kw})
    cfg.train.max_steps = steps
    cfg.data.path = str(data / "preferences.json")
    cfg.dpo = PreferenceConfig(reference=reference, reference_dir=str(tmp_path / "reference"))
    return cfg


def same_rows(got: list[dict], want: list[dict], rel: float = 1e-4, what: str = "") -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want], what
    for key in STATS:
        assert [r[key] for r in got] == pytest.approx([r[key] for r in want], rel=rel, abs=1e-6), (what, key)


def test_the_three_references_give_the_same_losses(llama_tokenizer_dir, data, tmp_path):
    """LoRA on the LLM (projector frozen): a precomputed pass, a frozen copy and the base with the adapters disabled
    are the same starting model; the policy moves (margins grow) and every reward agrees step by step."""
    results = {}
    for reference in ("precomputed", "copy", "adapters_off"):
        cfg = dpo_config(llama_tokenizer_dir, data, tmp_path, reference, reference, train_projector=False, lr=1e-2)
        cfg.model.lora = LoraSettings(r=8, alpha=16, dropout=0.1)  # dropout is turned off for DPO
        train(cfg)
        results[reference] = rows(tmp_path / reference)
    want = results["precomputed"]
    assert want[0]["loss"] == pytest.approx(0.693147, abs=2e-6)  # step 1: the policy is its reference
    assert all(abs(r["rewards/chosen"]) > 1e-3 for r in want[1:])  # the policy has moved from its reference
    same_rows(results["copy"], want, what="copy")
    same_rows(results["adapters_off"], want, what="adapters_off")


def test_a_run_through_the_cli_computes_its_reference_once(llama_tokenizer_dir, data, tmp_path):
    cfg = dpo_config(llama_tokenizer_dir, data, tmp_path, "cli")
    cfg_file = tmp_path / "stage3.yaml"
    save_config(cfg, cfg_file)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))

    def run(*overrides):
        result = subprocess.run([sys.executable, "-m", "llava_sft.train", str(cfg_file), *overrides], cwd=REPO,
                                env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stderr

    first = run()
    assert "computing the reference log-probs of 34 pairs" in first
    store = list((tmp_path / "reference").glob("*.json"))
    assert len(store) == 1 and len(json.loads(store[0].read_text())) == 34
    again = run("train.resume=never", "dpo.beta=0.2")  # other DPO settings: the same reference numbers
    assert "computing" not in again and "computed before for this data, model and settings" in again
    assert rows(tmp_path / "cli")[0]["loss"] == pytest.approx(0.693147, abs=2e-6)
    changed = run("train.resume=never", "data.max_length=200")  # a setting the numbers depend on: a new store
    assert "computing the reference log-probs" in changed and len(list((tmp_path / "reference").glob("*.json"))) == 2
    # the saved model scores pairs as training did (eval/preferences.py): against itself every margin is 0
    from llava_sft.eval.preferences import reward_accuracy, sequence_logps

    pairs = json.loads((data / "preferences.json").read_text())
    scored = reward_accuracy(tmp_path / "cli", tmp_path / "cli", data / "preferences.json", data / "images")
    assert scored["n"] == 34 and scored["accuracy"] == 0.0 and scored["mean_log_ratio_margin"] == 0.0
    assert set(scored["by_kind"]) == {"absent", "present", "color", "describe", "all"}  # "all": the text-only pairs
    logps = sequence_logps(tmp_path / "cli", pairs[:4], data / "images")
    assert all(c < 0 and r < 0 for c, r in logps.values()) and len(logps) == 4


def test_anyres_pairs_share_their_tiles_and_start_at_ln2(llama_tokenizer_dir, data, tmp_path):
    """AnyRes: each image's tiles are in the batch once, merged once, and its per-image feature list indexed for both
    sides; with the reference precomputed the first step is the policy against itself."""
    cfg = dpo_config(llama_tokenizer_dir, data, tmp_path, "anyres", max_steps=2)
    cfg.model.image_aspect = "anyres"
    train(cfg)
    got = rows(tmp_path / "anyres")
    assert got[0]["loss"] == pytest.approx(0.693147, abs=2e-6) and abs(got[1]["rewards/chosen"]) > 1e-4


def test_dropout_is_off_in_a_dpo_run_loras_too(llama_tokenizer_dir, data, tmp_path):
    """LoRA dropout 0.5 on adapters that are not the identity, the model in training mode: two forward passes of
    the same pairs give the same log-probs (with dropout they would not), as the reference's were computed."""
    import torch

    from llava_sft.train.build import build, make_collator
    from llava_sft.train.trainer import batch_extras

    cfg = dpo_config(llama_tokenizer_dir, data, tmp_path, "dropout", train_projector=False)
    cfg.model.lora = LoraSettings(r=8, alpha=16, dropout=0.5)
    model, tokenizer, dataset = build(cfg, torch.device("cpu"))
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(m.p == 0 for m in dropouts)
    with torch.no_grad():
        for name, p in model.llm.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p))
    model.train()
    batch = make_collator(cfg, tokenizer, model.tokens_per_image)([dataset[i] for i in range(4)])
    args = (batch["input_ids"], batch["attention_mask"], batch["images"], batch["labels"])
    with torch.no_grad():
        first, _ = model(*args, return_logps=True, **batch_extras(batch, "cpu"))
        second, _ = model(*args, return_logps=True, **batch_extras(batch, "cpu"))
    assert torch.equal(first, second)


def test_a_preemption_during_the_reference_pass_stops_it_and_stores_nothing(llama_tokenizer_dir, data, tmp_path):
    import torch

    from llava_sft.train.build import build, make_collator
    from llava_sft.train.engines.ddp import DDPEngine
    from llava_sft.train.guards import Preempted
    from llava_sft.train.reference import prepare, store_dir

    cfg = dpo_config(llama_tokenizer_dir, data, tmp_path, "preempted")
    model, tokenizer, dataset = build(cfg, torch.device("cpu"))
    engine = DDPEngine.local(model, train_cfg=cfg.train)
    notice = type("Notice", (), {"requested": True, "signal_name": "SIGTERM"})()
    with pytest.raises(Preempted, match="SIGTERM received"):
        prepare(cfg, engine, model, dataset, make_collator(cfg, tokenizer, model.tokens_per_image),
                torch.device("cpu"), False, notice)
    assert not list(store_dir(cfg).glob("*.json")) and dataset.reference is None


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_packed_and_two_ranks_on_every_engine_equal_one_process_and_resume_exactly(llama_tokenizer_dir, data,
                                                                                  tmp_path):
    """The pair is the unit: packed rows hold both sides; each rank's share has its own images and text-only
    pairs, ZeRO-3 and FSDP2 shard the policy (the reference precomputed through the same engine, or a frozen copy
    sharded alike)."""
    from tests.test_deepspeed import ds_json, torchrun

    def config(name, **kw):
        return dpo_config(llama_tokenizer_dir, data, tmp_path, name, max_steps=4, **kw)

    def cli(cfg, name):  # one process, as `python -m llava_sft.train` runs it
        save_config(cfg, tmp_path / f"{name}.yaml")
        result = subprocess.run([sys.executable, "-m", "llava_sft.train", str(tmp_path / f"{name}.yaml")], cwd=REPO,
                                env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)), capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]

    cli(config("plain", save_every=2), "plain")
    want = rows(tmp_path / "plain")
    assert len(want) == 4 and all(abs(r["rewards/chosen"]) > 1e-3 for r in want[1:])
    packed = config("packed")
    packed.data.packing = True
    cli(packed, "packed")
    same_rows(rows(tmp_path / "packed"), want, what="packed")
    torchrun(config("ddp"), tmp_path, "ddp", 29751)
    torchrun(config("zero2", deepspeed=str(ds_json(tmp_path, "zero2.json"))), tmp_path, "zero2", 29752)
    torchrun(config("zero3", deepspeed=str(ds_json(tmp_path, "zero3.json"))), tmp_path, "zero3", 29753)
    torchrun(config("fsdp2", engine="fsdp2"), tmp_path, "fsdp2", 29754)
    # a frozen copy as the reference, sharded as the policy is (ZeRO-3: an inference engine; FSDP2: fully_shard)
    torchrun(config("zero3-copy", reference="copy", deepspeed=str(ds_json(tmp_path, "zero3.json"))), tmp_path,
             "zero3-copy", 29755)
    torchrun(config("fsdp2-copy", reference="copy", engine="fsdp2"), tmp_path, "fsdp2-copy", 29756)
    for name in ("ddp", "zero2", "zero3", "fsdp2", "zero3-copy", "fsdp2-copy"):
        same_rows(rows(tmp_path / name), want, what=name)
    cli(config("resumed", resume=str(tmp_path / "plain" / "checkpoints" / "step_2")), "resumed")
    again = rows(tmp_path / "resumed")
    assert [r["step"] for r in again] == [3, 4]
    assert [r["loss"] for r in again] == [r["loss"] for r in want][2:]
