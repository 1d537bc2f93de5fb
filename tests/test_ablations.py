"""scripts/demo_ablations.sh's planning and arithmetic (the runs themselves are the script's, recorded in
benchmarks/RESULTS.md): each ablation changes exactly one thing against the full recipe, shared runs are run once,
the verdict follows from the numbers, and the outputs are written."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from llava_sft.config import load_config
from llava_sft.eval import ablations as ab

SHIPPED = load_config(ab.STAGE2).model.projector  # the demo recipe's projector (configs/demo/base_stage2.yaml)


@pytest.fixture
def base(tmp_path: Path) -> Path:
    llm = tmp_path / "base" / "llm"
    llm.mkdir(parents=True)
    (llm / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 600,
        "rms_norm_eps": 1e-06, "rope_theta": 10000.0,
        "transformers_version": "4.57.6", "torch_dtype": "float32"}))
    return tmp_path / "base"


def overrides(argv: list[str]) -> dict[str, str]:
    return dict(a.split("=", 1) for a in argv if "=" in a and "." in a.split("=", 1)[0])


def test_each_variant_changes_one_thing_and_loads_as_a_valid_config(base, tmp_path):
    data = tmp_path / "data"
    variants = ab.plan_runs(data, base, lr=1e-3)
    full = variants["full"]
    differs = {}
    for name, spec in variants.items():
        s1 = None if spec["stage1"] is None else overrides(spec["stage1"])
        s2 = overrides(spec["stage2"])
        changed = set()
        if s1 != overrides(full["stage1"]):
            changed.add("stage1" if s1 is None else "s1:" + ",".join(sorted(
                k for k in set(s1) | set(overrides(full["stage1"])) if s1.get(k) != overrides(full["stage1"]).get(k))))
        changed |= {"s2:" + k for k in set(s2) | set(overrides(full["stage2"]))
                    if s2.get(k) != overrides(full["stage2"]).get(k)}
        if spec.get("template"):
            changed.add("template")
        if spec.get("stage3") is not None:  # a Stage 3 after the variant's Stage 2 (a valid Stage-3 config)
            changed.add("stage3")
            load_config(ab.STAGE3, spec["stage3"] + ["train.pretrained_projector=null"])
        differs[name] = changed
        # every Stage-2 override set is a config the trainer accepts (values checked at load)
        load_config(ab.STAGE2, spec["stage2"] + ["train.pretrained_projector=null"])
    assert differs == {
        "full": set(),
        "no_stage1": {"stage1"},
        "no_mask": {"s2:data.loss_on"},
        "other_template": {"template"},
        "random_llm": {"s1:model.llm.config,model.llm.path", "s2:model.llm.config", "s2:model.llm.path"},
        "small_diverse": {"s2:data.path"},
        "two_types": {"s2:data.path"},
        "lora": {"s2:model.lora", "s2:train.lr", "s2:train.projector_lr"},
        "tower": {"s2:train.train_vision_tower", "s2:train.vision_tower_lr"},
        # the AnyRes row: both sides on the detail set (the pack budget fits its longer samples); only the aspect
        # differs between them
        "detail_pad": {"s2:data.path", "s2:data.image_folder", "s2:data.pack_max_tokens"},
        "detail_anyres": {"s2:data.path", "s2:data.image_folder", "s2:data.pack_max_tokens", "s2:model.image_aspect"},
        # the DPO row: the full recipe's Stages 1 and 2, then Stage 3 on the preference pairs
        "dpo": {"stage3"},
        # the projector row's two sides: the shipped one is the full recipe itself
        "mlp": set() if SHIPPED == "mlp2x_gelu" else {"s1:model.projector", "s2:model.projector"},
        "linear": set() if SHIPPED == "linear" else {"s1:model.projector", "s2:model.projector"},
    }
    assert variants["mlp"] == variants["full"] if SHIPPED == "mlp2x_gelu" else variants["linear"] == variants["full"]
    # the random-init LLM is the pretrained one's architecture, without its weights
    random_cfg = load_config(ab.STAGE2, variants["random_llm"]["stage2"]).model.llm
    assert random_cfg.path is None and random_cfg.config["hidden_size"] == 32
    assert random_cfg.config["rms_norm_eps"] == 1e-06  # a float, as saved (JSON's "1e-06" is a string in YAML)
    assert "architectures" not in random_cfg.config and "transformers_version" not in random_cfg.config
    assert load_config(ab.STAGE2, variants["tower"]["stage2"]).train.vision_tower_lr == pytest.approx(2e-4)
    lora = load_config(ab.STAGE2, variants["lora"]["stage2"])
    assert lora.model.lora.r == 1 and lora.model.lora.alpha == 2  # 64 x 32 / 4096 rounds to 0.5 -> at least 1
    assert lora.train.lr == pytest.approx(1e-2) and lora.train.projector_lr == pytest.approx(1e-3)
    assert load_config(ab.STAGE2, variants["detail_anyres"]["stage2"]).model.image_aspect == "anyres"
    assert variants["detail_anyres"]["eval_data"] == variants["detail_pad"]["eval_data"] == data / "detail"
    # every row compares variants that exist
    for row in ab.ROWS:
        assert {row.baseline, row.ablated, *row.also.values()} <= set(variants)


def test_shared_runs_are_planned_once_per_seed(base, tmp_path):
    variants = ab.plan_runs(tmp_path / "data", base, lr=1e-3)
    jobs, evals = ab.make_jobs(variants, [0, 1], tmp_path / "data", tmp_path / "out", [])
    stage1 = [j for j in jobs if j.startswith("s1-")]
    stage2 = [j for j in jobs if j.startswith("s2-")]
    # Stage 1: full recipe, random LLM, the projector the recipe does not ship (the AnyRes row uses the full
    # recipe's); Stage 2: every variant but other_template (eval only) and the shipped projector's (the full
    # recipe's own run)
    assert len(stage1) == 3 * 2 and len(stage2) == (len(variants) - 3) * 2  # dpo: the full recipe's Stage 2
    assert len([j for j in jobs if j.startswith("eval-")]) == (len(variants) - 1) * 2
    # Stage 3 starts from the full recipe's Stage-2 run of the same seed, and its held-out pairs are scored against it
    s3 = jobs[evals[("dpo", 0)][1]]
    run2 = tmp_path / "out" / "runs" / evals[("full", 0)][1]
    assert s3.deps == [evals[("full", 0)][1]] and f"model.llm.path={run2 / 'llm'}" in s3.argv
    assert f"train.pretrained_projector={run2}" in s3.argv and str(ab.STAGE3) in s3.argv
    pairs = jobs[f"pairs-{s3.name}"]
    assert pairs.deps == [s3.name] and pairs.argv[pairs.argv.index("--reference") + 1] == str(run2)
    detail = jobs[evals[("detail_anyres", 0)][0]]
    assert detail.argv[detail.argv.index("--data") + 1] == str(tmp_path / "data" / "detail")
    shipped = "mlp" if SHIPPED == "mlp2x_gelu" else "linear"
    assert evals[(shipped, 0)] == evals[("full", 0)] and evals[("mlp", 0)] != evals[("linear", 0)]
    full, other = evals[("full", 0)], evals[("other_template", 0)]
    assert full[1] == other[1] and full[0] != other[0]
    assert jobs[other[0]].argv[-2:] == ["--template", ab.OTHER_TEMPLATE]
    assert evals[("full", 0)][1] != evals[("full", 1)][1]
    # no Stage 1: the fresh projector is said explicitly, and the run depends on nothing
    no_s1 = jobs[evals[("no_stage1", 0)][1]]
    assert no_s1.deps == [] and "train.pretrained_projector=null" in no_s1.argv
    with_s1 = jobs[evals[("full", 0)][1]]
    assert with_s1.deps and f"train.pretrained_projector={tmp_path / 'out' / 'runs' / with_s1.deps[0]}" in with_s1.argv


def test_the_verdict_follows_the_numbers():
    n = 600
    m = ab.margin(0.85, 0.80, n)
    assert m == pytest.approx(2 * math.sqrt((0.85 * 0.15 + 0.80 * 0.20) / 600))  # ~0.044
    assert ab.verdict("baseline_better", 0.85, 0.80, n)[0] is True
    assert ab.verdict("baseline_better", 0.85, 0.83, n)[0] is False  # within the noise: not shown
    assert ab.verdict("baseline_better", 0.80, 0.85, n)[0] is False
    assert ab.verdict("ablated_better", 0.60, 0.80, n)[0] is True
    assert ab.verdict("close", 0.85, 0.83, n)[0] is True and ab.verdict("close", 0.85, 0.70, n)[0] is False
    assert ab.verdict("no_gain", 0.85, 0.87, n)[0] is True and ab.verdict("no_gain", 0.70, 0.85, n)[0] is False
    with pytest.raises(ValueError):
        ab.verdict("better", 0.8, 0.7, n)


def test_an_answer_that_goes_on_as_the_user_is_counted(tmp_path):
    answers = tmp_path / "answers.jsonl"
    rows = [{"question_id": 0, "text": "red"}, {"question_id": 1, "text": "2 USER: How many"},
            {"question_id": 2, "text": "yes. Is there a red circle?"}, {"question_id": 3, "text": "top left"}]
    answers.write_text("".join(json.dumps(r) + "\n" for r in rows))
    questions = {0: "What color is the circle?", 1: "How many shapes are there?", 2: "Is there a red circle?",
                 3: "Where is the red circle?"}
    assert ab.continues_as_user(answers, questions) == 0.5


def test_results_are_collected_into_json_markdown_and_a_chart(base, tmp_path):
    """Outputs from finished runs (metrics files written here with chosen accuracies): every row, its verdict, and
    the extra metrics read from the runs' own files."""
    data, out = tmp_path / "data", tmp_path / "out"
    (data / "eval").mkdir(parents=True)
    (data / "eval" / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in (
        {"question_id": 0, "text": "Where is it?"}, {"question_id": 1, "text": "Is there a red circle?"},
        {"question_id": 2, "text": "Is there a blue square?"}, {"question_id": 3, "text": "Is there a green circle?"})))
    # the DPO row's gold: two existence questions about absent objects, one about a present one
    (data / "eval" / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (
        {"question_id": 0, "answer": "left", "category": "position"},
        {"question_id": 1, "answer": "no", "category": "exists"}, {"question_id": 2, "answer": "no", "category": "exists"},
        {"question_id": 3, "answer": "yes", "category": "exists"})))
    variants = ab.plan_runs(data, base, lr=1e-3)
    jobs, evals = ab.make_jobs(variants, [0, 1], data, out, [])
    accuracy = {"full": 0.9, "no_stage1": 0.7, "no_mask": 0.88, "other_template": 0.2, "random_llm": 0.5,
                "small_diverse": 0.8, "two_types": 0.5, "lora": 0.89, "tower": 0.9, "detail_pad": 0.6,
                "detail_anyres": 0.8, "dpo": 0.89}
    # the shipped projector's side is the full recipe's run (its accuracy); the other side is written so that the
    # MLP wins by 0.05, above the 2-standard-error margin (~0.033 at 600 answers per arm)
    accuracy.update({"linear": 0.9, "mlp": 0.95} if SHIPPED == "linear" else {"mlp": 0.9, "linear": 0.85})
    for (variant, seed), (ev, s2) in evals.items():
        (out / "runs" / ev).mkdir(parents=True, exist_ok=True)
        (out / "runs" / ev / "metrics.json").write_text(json.dumps(
            {"overall": {"accuracy": accuracy[variant] + (0.01 if seed else -0.01)}, "by_type": {}, "n": 300}))
        # the Stage-2 model says "yes" about both absent objects, the DPO model about none of them
        said = {"dpo": "no", "no_mask": "USER: hi"}.get(variant, "Yes.")
        (out / "runs" / ev / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (
            {"question_id": 0, "text": "USER: hi" if variant == "no_mask" else "left"},
            {"question_id": 1, "text": said}, {"question_id": 2, "text": said},
            {"question_id": 3, "text": "USER: hi" if variant == "no_mask" else "yes"})))
        if variant == "dpo":
            (out / "runs" / f"pairs-{s2}").mkdir(parents=True, exist_ok=True)
            (out / "runs" / f"pairs-{s2}" / "metrics.json").write_text(json.dumps(
                {"accuracy": 0.8 + 0.1 * seed, "n": 300, "by_kind": {"absent": 0.9}}))
        (out / "runs" / s2).mkdir(parents=True, exist_ok=True)
        trainable = 10 if variant == "lora" else 100
        (out / "runs" / s2 / "report.json").write_text(json.dumps(
            {"parameters": {"llm": {"trainable": trainable, "total": 100}, "vision_tower": {"trainable": 0, "total": 100}}}))
    results = ab.collect(out, data, jobs, evals, [0, 1])
    rows = {r["key"]: r for r in results["rows"]}
    assert len(rows) == 10 and rows["anyres"]["agrees"] is True
    dpo = rows["dpo"]  # fewer "yes" about absent objects (1.0 -> 0.0), accuracy within 2 SE (0.90 vs 0.89)
    assert dpo["extra_metric"]["baseline"] == 1.0 and dpo["extra_metric"]["ablated"] == 0.0 and dpo["agrees"] is True
    assert dpo["reward_accuracy"]["per_seed"] == pytest.approx([0.8, 0.9])
    assert rows["stage1"]["baseline"] == pytest.approx(0.9) and rows["stage1"]["agrees"] is True
    assert rows["stage1"]["baseline_per_seed"] == pytest.approx([0.89, 0.91])
    assert rows["masking"]["extra_metric"]["ablated"] == 1.0 and rows["masking"]["extra_metric"]["baseline"] == 0.0
    assert rows["lora"]["extra_metric"]["ablated"] == pytest.approx(0.05) and rows["lora"]["agrees"] is True
    assert rows["diversity"]["agrees"] is True and rows["diversity"]["also"]["full set (6,000, every type)"]["accuracy"] == 0.9
    assert rows["projector"]["agrees"] is True and rows["tower"]["agrees"] is True
    assert (rows["projector"]["baseline"], rows["projector"]["ablated"]) == pytest.approx(
        (0.95, 0.9) if SHIPPED == "linear" else (0.9, 0.85))  # baseline = the MLP, whichever the recipe ships
    table = ab.markdown(results)
    assert table.count("\n| ") == 10 and "does not agree" not in table  # 10 rows below the header
    ab.plot(results, out / "results.png")
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_script_runs_every_row_through_the_cli_at_tiny_sizes(tmp_path):
    """scripts/demo_ablations.sh end to end, shrunk (tiny data, 2 pretraining steps, 1 optimizer step per run):
    every variant trains and evaluates through python -m llava_sft.train / run_shapes, the outputs are written, and a
    rerun reuses every finished run."""
    import os
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, DEMO_DATA=str(tmp_path / "data"), DEMO_OUT=str(tmp_path / "out"),
               DEMO_SIZES="--n-stage1 48 --n-stage2 48 --n-eval 10", DEMO_PROSE="200", DEMO_WARMUP="8",
               DEMO_BASE_ARGS="--lm-steps 2 --lm-batch 4 --clip-steps 2 --clip-batch 16", DEMO_PREFS="--n 16 --n-eval 8")
    args = ["bash", "scripts/demo_ablations.sh", "--seeds", "0", "--stage1", "train.max_steps=1",
            "--stage2", "train.max_steps=1", "--stage3", "train.max_steps=1"]
    proc = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=580)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "out" / "ablations"
    results = json.loads((out / "results.json").read_text())
    assert [r["key"] for r in results["rows"]] == [row.key for row in ab.ROWS]
    for r in results["rows"]:
        assert {"claim", "source", "change", "baseline", "ablated", "metric", "agrees"} <= set(r)
        assert isinstance(r["agrees"], bool) and 0 <= r["baseline"] <= 1 and 0 <= r["ablated"] <= 1
    lora = next(r for r in results["rows"] if r["key"] == "lora")["extra_metric"]
    assert 0 < lora["ablated"] < lora["baseline"] <= 1  # LoRA trains a small share of what full fine-tuning does
    assert (out / "results.md").is_file() and (out / "results.png").stat().st_size > 0
    again = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0
    lines = [line.split("] ", 1)[1].split()[0] for line in again.stdout.splitlines() if line.startswith("[ablations")]
    assert lines.count("reused") == len(results["commands"]) and "started" not in lines


def test_a_finished_run_is_reused_only_for_the_same_command_and_inputs(tmp_path):
    """run_jobs reruns a finished job when the base models or data it read have changed (the fingerprint differs),
    not only when its command has: a rebuilt base must not leave the table on the old one's runs."""
    out = tmp_path / "abl"
    script = ("import pathlib, sys; d = pathlib.Path(sys.argv[1]); d.mkdir(parents=True, exist_ok=True); "
              "(d / 'report.json').write_text('{}')")
    jobs = {"a": ab.Job("a", [sys.executable, "-c", script, str(out / "runs" / "a")], [], "report.json")}

    def run(inputs: str) -> list[str]:
        said: list[str] = []
        ab.run_jobs(jobs, out, 1, said.append, inputs)
        return [line.split()[0] for line in said]

    assert run("base-1") == ["started", "finished"]
    assert run("base-1") == ["reused"]
    assert run("base-2") == ["started", "finished"]


def test_the_inputs_fingerprint_follows_content_not_location(tmp_path):
    """The same files in another directory give the same fingerprint; one changed byte in the LLM's weights, or in
    the Stage-2 data, gives another."""
    import shutil

    data, base = tmp_path / "data", tmp_path / "base"
    (data / "eval").mkdir(parents=True)
    (base / "llm").mkdir(parents=True)
    (data / "stage2.json").write_text("[]")
    (data / "eval" / "questions.jsonl").write_text("{}\n")
    (base / "clip.pt").write_bytes(b"tower")
    (base / "llm" / "model.safetensors").write_bytes(b"weights")
    first = ab.inputs_fingerprint(data, base)
    shutil.copytree(data, tmp_path / "moved" / "d")
    shutil.copytree(base, tmp_path / "moved" / "b")
    assert ab.inputs_fingerprint(tmp_path / "moved" / "d", tmp_path / "moved" / "b") == first
    (base / "llm" / "model.safetensors").write_bytes(b"weightz")
    assert ab.inputs_fingerprint(data, base) != first
    (base / "llm" / "model.safetensors").write_bytes(b"weights")
    (data / "stage2.json").write_text("[ ]")
    assert ab.inputs_fingerprint(data, base) != first
