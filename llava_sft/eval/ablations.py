"""The SFT lessons, measured on the demo (scripts/demo_ablations.sh): each row reruns the stage a claim is about with
one thing changed, at each seed, and sets the held-out accuracy beside what the paper or the SFT notes claim.

    python -m llava_sft.eval.ablations --data data/demo --base checkpoints/demo/base --out checkpoints/demo/ablations

Every run goes through the user's path: `python -m llava_sft.train` on the shipped demo recipes
(configs/demo/base_stage{1,2}.yaml) with key=value overrides, then `python -m llava_sft.eval.run_shapes`. A run whose
command and inputs match a finished one is reused, so an interrupted script continues where it stopped.

The verdict is computed, never written: a difference counts when it exceeds two standard errors of the difference of
two accuracies (binomial, n = questions x seeds per arm), the noise a rerun at other seeds would show.
Writes OUT/results.json ({"rows": [...], "runs": {...}}), OUT/results.md and OUT/results.png.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from llava_sft.eval.preferences import yes_on_absent

REPO = Path(__file__).resolve().parents[2]
STAGE1, STAGE2 = REPO / "configs/demo/base_stage1.yaml", REPO / "configs/demo/base_stage2.yaml"
STAGE3 = REPO / "configs/demo/stage3_dpo.yaml"  # the DPO row: Stage 3 from the row's Stage-2 run
OTHER_TEMPLATE = "chatml"  # the "wrong template" row prompts a vicuna_v1-trained model with this one
# LoRA r 64 on every linear layer of a 4096-wide LLM, scaled to the demo's width (the rank-to-width ratio kept:
# r 64 on a width-128 model would be half-rank, as many weights as full fine-tuning); alpha = 2r and an LR 10x
# the full one with the projector at the full LR, as LLaVA-1.5's LoRA recipe (r 128, alpha 256, 2e-4 vs 2e-5)
LORA_RANK_AT_4096, LORA_LR_FACTOR = 64, 10
TOWER_LR_SHARE = 0.2  # LLaVA-NeXT: mm_vision_tower_lr 2e-6 at lr 1e-5
# the AnyRes row's data (scripts/demo_ablations.sh: make_shapes --image-size 96 --shape-scale 0.5 into DATA/detail):
# the main set's layouts and questions, on canvases twice the tower's 48 px with shapes half their size -- in a
# 48-px tile a shape is its usual size in pixels, in the one 48-px view of `pad` a quarter of its area
DETAIL_DIR, DETAIL_SIZE, DETAIL_SHAPE_SCALE = "detail", 96, 0.5
DETAIL_PACK_TOKENS = 224  # an AnyRes image is 9 + 6 x 7 = 51 tokens here (pad: 9): the longest sample still fits


@dataclass(frozen=True)
class Row:
    key: str
    claim: str
    source: str
    change: str
    baseline: str  # run variants (evaluations) compared
    ablated: str
    expect: str  # "baseline_better" | "ablated_better" | "close" | "no_gain"
    extra: str = ""  # "continues_as_user" | "trainable_share" | "hallucination"
    also: dict = field(default_factory=dict)  # other variants shown in the row: label -> variant


ROWS = (
    Row("stage1", "Stage-1 alignment helps",
        "LLaVA (Liu et al., 2023): ScienceQA 90.92 with Stage-1 pretraining vs 85.81 without",
        "Stage 2 from a fresh projector (no Stage 1)", "full", "no_stage1", "baseline_better"),
    Row("masking", "Loss masking is not optional",
        "LLaVA (Liu et al., 2023): the loss is computed on the assistant's answers (and their stop token) only",
        "Stage 2 with labels on every token (data.loss_on=all)", "full", "no_mask", "baseline_better",
        extra="continues_as_user"),
    Row("template", "The chat template matters",
        "SFT practice: prompt a model with the template it was trained with",
        f"evaluate the Stage-2 model with {OTHER_TEMPLATE} instead of vicuna_v1", "full", "other_template",
        "baseline_better"),
    Row("superficial", "SFT teaches format, knowledge comes from pretraining",
        "LIMA (Zhou et al., 2023): the superficial alignment hypothesis",
        "Stages 1+2 on a random-init LLM of the same size, same budget", "full", "random_llm", "baseline_better"),
    Row("diversity", "Quality and diversity beat quantity",
        "LIMA (Zhou et al., 2023): 1,000 curated, diverse examples",
        "Stage 2 on 1,000 samples of every question type vs 6,000 of two types (color, shape)",
        "two_types", "small_diverse", "ablated_better", also={"full set (6,000, every type)": "full"}),
    Row("lora", "LoRA (r 64, all linear layers) comes close to full fine-tuning",
        "QLoRA (Dettmers et al., 2023): LoRA on every linear layer matches full fine-tuning",
        "Stage 2 with LoRA on every linear layer, r 64 x width / 4096 (model.lora), 10x lr", "full", "lora", "close",
        extra="trainable_share"),
    Row("tower", "The vision encoder need not train during SFT",
        "LLaVA / LLaVA-1.5 (Liu et al., 2023): CLIP stays frozen in both stages",
        f"Stage 2 with the tower trainable at {TOWER_LR_SHARE:g} x lr (train.train_vision_tower)", "full", "tower",
        "no_gain"),
    Row("projector", "An MLP projector beats a linear one",
        "LLaVA-1.5 (Liu et al., 2023b): the 2-layer MLP projector improves on the linear one",
        "projector: mlp2x_gelu vs linear (Stages 1 and 2)", "mlp", "linear", "baseline_better"),
    Row("anyres", "Dynamic high resolution helps where objects are small",
        "LLaVA-NeXT (Liu et al., 2024): AnyRes tiles at the tower's resolution help fine-grained detail",
        f"Stage 2 and eval on {DETAIL_SIZE}-px canvases with shapes at {DETAIL_SHAPE_SCALE:g} x their size: "
        f"image_aspect pad (one 48-px view) vs anyres (2 x 2 tiles + the base view)", "detail_pad", "detail_anyres",
        "ablated_better"),
    Row("dpo", "Preference optimisation reduces hallucination",
        "RLAIF-V (Yu et al., CVPR 2025): DPO of LLaVA-1.5 on pairs of a faithful and a hallucinating reply cuts "
        "object hallucination (Object HalBench, AMBER)",
        "Stage 3: DPO + an SFT term (RPO; pure DPO made the tiny model worse) from the Stage-2 model on 2,000 demo "
        "pairs (the truth vs a wrong colour, 'yes' about an absent object, an invented object in a description; "
        "configs/demo/stage3_dpo.yaml)", "full", "dpo",
        "ablated_better", extra="hallucination"),
)


# ----------------------------------------------------------------------------------------------------- the runs
def random_llm_config(llm_dir: Path) -> str:
    """The pretrained LLM's architecture as a model.llm.config value: the same model, randomly initialised."""
    config = json.loads((llm_dir / "config.json").read_text())
    for key in ("architectures", "transformers_version", "torch_dtype", "dtype", "_name_or_path"):
        config.pop(key, None)
    # YAML, not JSON: the override is read by yaml.safe_load, which takes JSON's 1e-06 for a string (YAML 1.1
    # floats need a dot; rms_norm_eps then failed inside the first forward pass); safe_dump writes 1.0e-06
    return yaml.safe_dump(config, default_flow_style=True, width=10**9).strip()


def lora_setting(llm_dir: Path) -> str:
    width = json.loads((llm_dir / "config.json").read_text())["hidden_size"]
    rank = max(1, round(LORA_RANK_AT_4096 * width / 4096))
    return f"{{r: {rank}, alpha: {2 * rank}, dropout: 0.05}}"


def plan_runs(data: Path, base: Path, lr: float) -> dict[str, dict]:
    """variant -> {"stage1": overrides or None (no Stage 1), "stage2": overrides, "template": None or name};
    variants sharing a Stage-1 or Stage-2 run share it (same overrides)."""
    common = [f"model.tokenizer={data / 'tokenizer'}", f"data.image_folder={data / 'images'}",
              f"model.llm.path={base / 'llm'}", f"model.vision.pretrained={base / 'clip.pt'}"]
    s1 = common + [f"data.path={data / 'stage1.json'}"]
    s2 = common + [f"data.path={data / 'stage2.json'}"]
    random_llm = ["model.llm.path=null", f"model.llm.config={random_llm_config(base / 'llm')}"]
    # the projector row names both of its sides; the one the recipe ships is the full recipe's own runs (shared)
    shipped = yaml.safe_load(STAGE2.read_text())["model"]["projector"]
    projector = {kind: [] if kind == shipped else [f"model.projector={kind}"] for kind in ("mlp2x_gelu", "linear")}

    def with_(overrides, extra):
        keys = {o.split("=", 1)[0] for o in extra}
        return [o for o in overrides if o.split("=", 1)[0] not in keys] + extra

    detail = data / DETAIL_DIR
    s2_detail = with_(s2, [f"data.path={detail / 'stage2.json'}", f"data.image_folder={detail / 'images'}",
                           f"data.pack_max_tokens={DETAIL_PACK_TOKENS}"])
    return {
        "full": {"stage1": s1, "stage2": s2},
        # Stage 1 is the main one (LLaVA-NeXT's Stage 1 is LLaVA-1.5's projector); both sides differ in the aspect only
        "detail_pad": {"stage1": s1, "stage2": s2_detail, "eval_data": detail},
        "detail_anyres": {"stage1": s1, "stage2": s2_detail + ["model.image_aspect=anyres"], "eval_data": detail},
        "no_stage1": {"stage1": None, "stage2": s2},
        "no_mask": {"stage1": s1, "stage2": s2 + ["data.loss_on=all"]},
        "other_template": {"stage1": s1, "stage2": s2, "template": OTHER_TEMPLATE},
        "random_llm": {"stage1": with_(s1, random_llm), "stage2": with_(s2, random_llm)},
        "small_diverse": {"stage1": s1, "stage2": with_(s2, [f"data.path={data / 'stage2_1k.json'}"])},
        "two_types": {"stage1": s1, "stage2": with_(s2, [f"data.path={data / 'stage2_two_types.json'}"])},
        "lora": {"stage1": s1, "stage2": s2 + [f"model.lora={lora_setting(base / 'llm')}",
                                               f"train.lr={lr * LORA_LR_FACTOR:g}", f"train.projector_lr={lr:g}"]},
        "tower": {"stage1": s1, "stage2": s2 + ["train.train_vision_tower=true",
                                                f"train.vision_tower_lr={lr * TOWER_LR_SHARE:g}"]},
        # Stage 3 from the full recipe's Stage-2 run (make_jobs adds its LLM and projector)
        "dpo": {"stage1": s1, "stage2": s2, "stage3": [o for o in common if not o.startswith("model.llm.path=")]
                + [f"data.path={data / 'preferences.json'}"]},
        "mlp": {"stage1": with_(s1, projector["mlp2x_gelu"]), "stage2": with_(s2, projector["mlp2x_gelu"])},
        "linear": {"stage1": with_(s1, projector["linear"]), "stage2": with_(s2, projector["linear"])},
    }


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:10]


@dataclass
class Job:
    name: str  # directory under OUT/runs
    argv: list[str]
    deps: list[str]
    done_file: str  # written last by a finished run


def make_jobs(variants: dict[str, dict], seeds: list[int], data: Path, out: Path, stage2_extra: list[str],
              stage1_extra: list[str] = (), stage3_extra: list[str] = ()) -> tuple[
        dict[str, Job], dict[tuple[str, int], tuple[str, str]]]:
    """The de-duplicated jobs (Stage 1, Stage 2, evaluation) and, per (variant, seed), its (evaluation, Stage-2)
    job names."""
    jobs: dict[str, Job] = {}
    evals: dict[tuple[str, int], tuple[str, str]] = {}
    py = sys.executable
    for seed in seeds:
        for variant, spec in variants.items():
            deps, projector = [], "null"
            if spec["stage1"] is not None:
                s1_over = spec["stage1"] + list(stage1_extra) + [f"train.seed={seed}"]
                s1 = f"s1-{_digest(s1_over)}-seed{seed}"
                run1 = out / "runs" / s1
                jobs.setdefault(s1, Job(s1, [py, "-m", "llava_sft.train", str(STAGE1), *s1_over,
                                             f"train.output_dir={run1}", "train.resume=never"], [], "report.json"))
                deps, projector = [s1], str(run1)
            s2_over = spec["stage2"] + stage2_extra + [f"train.seed={seed}", f"train.pretrained_projector={projector}"]
            s2 = f"s2-{_digest(s2_over)}-seed{seed}"
            run2 = out / "runs" / s2
            jobs.setdefault(s2, Job(s2, [py, "-m", "llava_sft.train", str(STAGE2), *s2_over,
                                         f"train.output_dir={run2}", "train.resume=never"], deps, "report.json"))
            trained, run = s2, run2
            if spec.get("stage3") is not None:  # DPO from this Stage-2 run; its held-out pairs scored against it
                s3_over = spec["stage3"] + list(stage3_extra) + [f"train.seed={seed}", f"model.llm.path={run2 / 'llm'}",
                                                                 f"train.pretrained_projector={run2}"]
                s3 = f"s3-{_digest(s3_over)}-seed{seed}"
                run3 = out / "runs" / s3
                jobs.setdefault(s3, Job(s3, [py, "-m", "llava_sft.train", str(STAGE3), *s3_over,
                                             f"train.output_dir={run3}", "train.resume=never"], [s2], "report.json"))
                pairs = f"pairs-{s3}"
                jobs.setdefault(pairs, Job(pairs, [py, "-m", "llava_sft.eval.preferences", "--model", str(run3),
                                                   "--reference", str(run2), "--pairs",
                                                   str(data / "preferences_eval.json"), "--images",
                                                   str(data / "images"), "--describe", str(data), "--out",
                                                   str(out / "runs" / pairs / "metrics.json")], [s3], "metrics.json"))
                trained, run = s3, run3
            template = spec.get("template")
            ev = f"eval-{trained}" + (f"-{template}" if template else "")
            jobs.setdefault(ev, Job(ev, [py, "-m", "llava_sft.eval.run_shapes", "--model", str(run), "--data",
                                         str(spec.get("eval_data", data)), "--out", str(out / "runs" / ev), "--no-blind",
                                         *(["--template", template] if template else [])], [trained], "metrics.json"))
            evals[(variant, seed)] = (ev, trained)
    return jobs, evals


def inputs_fingerprint(data: Path, base: Path) -> str:
    """What every run reads besides its command: the base models' weights and the demo data's training, eval,
    image-record (meta.jsonl: the images are drawn from it) and tokenizer files, by content. A rebuilt base (other settings, another machine's floats) or regenerated data
    changes it, so finished runs from before are rerun, not silently reused."""
    h = hashlib.sha256()
    files = [(base, base / "clip.pt"), *((base, f) for f in sorted((base / "llm").glob("*"))),
             *((data, f) for pattern in ("*.json", "*.jsonl", "eval/*", "tokenizer/*", f"{DETAIL_DIR}/*.json",
                                         f"{DETAIL_DIR}/*.jsonl", f"{DETAIL_DIR}/eval/*") for f in sorted(data.glob(pattern)))]
    for root, f in files:
        if f.is_file():
            h.update(f"{f.relative_to(root)}\0".encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def run_jobs(jobs: dict[str, Job], out: Path, workers: int, log, inputs: str = "") -> None:
    """Run the jobs in dependency order, `workers` at a time with the cores shared between them (several small
    single-threaded runs use 2 cores better than one run on both). A job whose command and inputs (``inputs``:
    inputs_fingerprint) match those recorded in its finished directory is reused."""
    threads = max(1, (os.cpu_count() or 1) // workers)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               PYTHONWARNINGS="ignore", LLAVA_SKIP_ENVCHECK="1")
    state: dict[str, str] = {}
    for name, job in jobs.items():
        d = out / "runs" / name
        if (d / job.done_file).is_file() and (d / "command.json").is_file() and \
                json.loads((d / "command.json").read_text()) == {"argv": job.argv, "inputs": inputs}:
            state[name] = "done"
            log(f"reused   {name}")

    def launch(job: Job) -> tuple[str, int, float]:
        d = out / "runs" / job.name
        d.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        with open(out / "runs" / f"{job.name}.log", "w") as f:
            rc = subprocess.run(job.argv, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
        if rc == 0:
            (d / "command.json").write_text(json.dumps({"argv": job.argv, "inputs": inputs}))
        return job.name, rc, time.time() - t0

    with ThreadPoolExecutor(workers) as pool:
        running = {}
        while len(state) < len(jobs) or running:
            for name, job in jobs.items():
                if name not in state and len(running) < workers and all(state.get(d) == "done" for d in job.deps):
                    state[name] = "running"
                    running[name] = pool.submit(launch, job)
                    log(f"started  {name}")
            if not running:
                failed = [n for n, s in state.items() if s == "failed"]
                raise RuntimeError(f"ablation runs failed: {failed} (logs in {out / 'runs'})")
            finished = next(iter(_wait(running)))
            name, rc, seconds = running.pop(finished).result()
            state[name] = "done" if rc == 0 else "failed"
            log(f"{'finished' if rc == 0 else 'FAILED  '} {name} in {seconds:.0f} s" +
                ("" if rc == 0 else f" (exit {rc}, log {out / 'runs' / (name + '.log')})"))
            if rc != 0:  # the other runs may still finish; this one's dependants never start
                for other, job in jobs.items():
                    if other not in state and name in job.deps:
                        state[other] = "failed"


def _wait(running: dict):
    from concurrent.futures import FIRST_COMPLETED, wait

    done, _ = wait(list(running.values()), return_when=FIRST_COMPLETED)
    return [name for name, fut in running.items() if fut in done]


# ------------------------------------------------------------------------------------------- the numbers
def continues_as_user(answers: Path, questions: dict[int, str]) -> float:
    """Share of answers that go on as the user would: hold the template's user marker or repeat the question."""
    rows = [json.loads(line) for line in answers.read_text().splitlines() if line.strip()]

    def norm(text: str) -> str:
        return " ".join(re.sub(r"[^a-z0-9 ]", " ", text.lower()).split())

    hits = sum("USER" in r["text"] or norm(questions[int(r["question_id"])]) in norm(r["text"]) for r in rows)
    return hits / len(rows)


def trainable_share(run_dir: Path) -> float:
    parameters = json.loads((run_dir / "report.json").read_text())["parameters"]
    return sum(p["trainable"] for p in parameters.values()) / sum(p["total"] for p in parameters.values())


def margin(p: float, q: float, n: int) -> float:
    """Two standard errors of the difference of two accuracies p and q, each measured on n answers."""
    return 2 * math.sqrt((p * (1 - p) + q * (1 - q)) / n)


def verdict(expect: str, base: float, abl: float, n: int) -> tuple[bool, str]:
    m = margin(base, abl, n)
    if expect == "baseline_better":
        return base - abl > m, f"baseline - ablated = {base - abl:+.3f}, needs > {m:.3f} (2 SE)"
    if expect == "ablated_better":
        return abl - base > m, f"ablated - baseline = {abl - base:+.3f}, needs > {m:.3f} (2 SE)"
    if expect == "close":
        return base - abl <= m, f"baseline - ablated = {base - abl:+.3f}, needs <= {m:.3f} (2 SE)"
    if expect == "no_gain":
        return abl - base <= m, f"ablated - baseline = {abl - base:+.3f}, needs <= {m:.3f} (2 SE)"
    raise ValueError(f"unknown expectation {expect!r}")


def collect(out: Path, data: Path, jobs: dict[str, Job], evals: dict[tuple[str, int], tuple[str, str]],
            seeds: list[int], rows_measured: tuple[Row, ...] = ROWS) -> dict:
    questions = {int(q["question_id"]): q["text"] for q in
                 map(json.loads, (data / "eval" / "questions.jsonl").read_text().splitlines())}
    acc = {key: json.loads((out / "runs" / ev / "metrics.json").read_text()) for key, (ev, _) in evals.items()}
    n_questions = next(iter(acc.values()))["n"]

    def mean(variant: str) -> float:
        return sum(acc[(variant, s)]["overall"]["accuracy"] for s in seeds) / len(seeds)

    def per_seed(variant: str) -> list[float]:
        return [acc[(variant, s)]["overall"]["accuracy"] for s in seeds]

    rows = []
    for row in rows_measured:
        base, abl = mean(row.baseline), mean(row.ablated)
        agrees, rule = verdict(row.expect, base, abl, n_questions * len(seeds))
        entry = {"claim": row.claim, "source": row.source, "change": row.change, "key": row.key,
                 "metric": "held-out accuracy (mean over seeds)", "baseline": round(base, 4), "ablated": round(abl, 4),
                 "baseline_run": row.baseline, "ablated_run": row.ablated, "baseline_per_seed": per_seed(row.baseline),
                 "ablated_per_seed": per_seed(row.ablated), "agrees": agrees, "rule": rule, "seeds": seeds,
                 "also": {label: {"run": v, "accuracy": round(mean(v), 4), "per_seed": per_seed(v)}
                          for label, v in row.also.items()}}
        if row.extra == "continues_as_user":
            shares = {v: sum(continues_as_user(out / "runs" / evals[(v, s)][0] / "answers.jsonl", questions)
                             for s in seeds) / len(seeds) for v in (row.baseline, row.ablated)}
            entry["extra_metric"] = {"name": "share of answers that continue as the user (hold 'USER' or repeat "
                                             "the question)", "baseline": round(shares[row.baseline], 4),
                                     "ablated": round(shares[row.ablated], 4)}
            # masking shows in either number: lower accuracy, or answers that go on with the user's turn
            more, why = verdict("ablated_better", shares[row.baseline], shares[row.ablated], n_questions * len(seeds))
            entry["agrees"] = agrees or more
            entry["rule"] = f"{rule}, or continuing as the user: {why}"
        if row.extra == "hallucination":  # the verdict: fewer "yes" about absent objects, accuracy not lower
            rates = {v: [yes_on_absent(out / "runs" / evals[(v, s)][0] / "answers.jsonl",
                                       data / "eval" / "answers.jsonl") for s in seeds] for v in (row.baseline, row.ablated)}
            n_absent = rates[row.baseline][0]["n"] * len(seeds)
            rate = {v: sum(r["rate"] for r in rs) / len(seeds) for v, rs in rates.items()}
            rewards = [json.loads((out / "runs" / f"pairs-{evals[(row.ablated, s)][1]}" / "metrics.json").read_text())
                       for s in seeds]
            entry["extra_metric"] = {"name": "'yes' to questions about absent objects", "baseline":
                                     round(rate[row.baseline], 4), "ablated": round(rate[row.ablated], 4)}
            entry["reward_accuracy"] = {"held_out_pairs": rewards[0]["n"], "per_seed": [r["accuracy"] for r in rewards],
                                        "by_kind": [r["by_kind"] for r in rewards]}
            if all("descriptions" in r for r in rewards):  # CHAIR-style: descriptions naming an absent object
                entry["invented_objects"] = {side: [r["descriptions"][key]["invented"] for r in rewards]
                                             for side, key in (("baseline", "reference"), ("ablated", "model"))}
            fewer, why = verdict("baseline_better", rate[row.baseline], rate[row.ablated], n_absent)
            kept, how = verdict("close", base, abl, n_questions * len(seeds))  # accuracy not lower by > 2 SE
            entry["agrees"] = fewer and kept
            entry["rule"] = f"'yes' on absent objects, baseline - ablated = {why.split('= ', 1)[1]}; accuracy " \
                            f"not lower: {how.split('= ', 1)[1]}"
        if row.extra == "trainable_share":
            shares = {v: sum(trainable_share(out / "runs" / evals[(v, s)][1]) for s in seeds)
                      / len(seeds) for v in (row.baseline, row.ablated)}
            entry["extra_metric"] = {"name": "trainable share of the parameters", "baseline": round(shares[row.baseline], 4),
                                     "ablated": round(shares[row.ablated], 4)}
        rows.append(entry)
    runs = {f"{v}@seed{s}": {"eval": ev, "train": s2, "accuracy": acc[(v, s)]["overall"]["accuracy"],
                             "by_type": {t: m["accuracy"] for t, m in acc[(v, s)]["by_type"].items()}}
            for (v, s), (ev, s2) in sorted(evals.items())}
    return {"rows": rows, "runs": runs, "questions": n_questions, "seeds": seeds,
            "commands": {name: job.argv for name, job in jobs.items()}}


def markdown(results: dict) -> str:
    lines = ["| claim | source | change in the miniature | baseline | ablated | extra metric (baseline / ablated) | "
             "verdict |", "|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        also = "".join(f"; {label}: {v['accuracy']:.3f}" for label, v in r["also"].items())
        extra = r.get("extra_metric")
        extra = f"{extra['name']}: {extra['baseline']:.3f} / {extra['ablated']:.3f}" if extra else "—"
        lines.append(f"| {r['claim']} | {r['source']} | {r['change']} | {r['baseline']:.3f} | {r['ablated']:.3f}"
                     f"{also} | {extra} | {'agrees' if r['agrees'] else 'does not agree'} ({r['rule']}) |")
    seeds = ", ".join(map(str, results["seeds"]))
    lines.append(f"\nHeld-out accuracy on {results['questions']} questions, mean over training seeds {seeds}.")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    fig, ax = plt.subplots(figsize=(10, 4.8))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["baseline"] for r in rows], 0.4, label="baseline", color="#4C72B0")
    ax.bar([i + 0.2 for i in x], [r["ablated"] for r in rows], 0.4, label="ablated", color="#DD8452")
    for i, r in enumerate(rows):
        ax.plot([i - 0.2] * len(r["baseline_per_seed"]), r["baseline_per_seed"], "k.", ms=4)
        ax.plot([i + 0.2] * len(r["ablated_per_seed"]), r["ablated_per_seed"], "k.", ms=4)
        ax.text(i, 1.02, "agrees" if r["agrees"] else "does not", ha="center", fontsize=8,
                color="green" if r["agrees"] else "red")
    ax.set_xticks(list(x), [r["key"] for r in rows], rotation=20)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("held-out accuracy")
    ax.set_title("SFT lessons in the miniature (dots: seeds)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("data/demo"), help="make_shapes output with --ablation-sets")
    ap.add_argument("--base", type=Path, default=Path("checkpoints/demo/base"), help="data_prep.pretrain_base output")
    ap.add_argument("--out", type=Path, default=Path("checkpoints/demo/ablations"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (the cores are shared between them)")
    ap.add_argument("--stage1", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every Stage-1 run")
    ap.add_argument("--stage2", nargs="*", default=[], metavar="KEY=VALUE",
                    help="overrides for every Stage-2 run (e.g. train.epochs=3: a shorter budget for all rows)")
    ap.add_argument("--stage3", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every Stage-3 run")
    ap.add_argument("--rows", nargs="*", choices=[r.key for r in ROWS], help="only these rows (default: all)")
    args = ap.parse_args(argv)
    data, base, out = args.data.resolve(), args.base.resolve(), args.out.resolve()
    rows = tuple(r for r in ROWS if not args.rows or r.key in args.rows)
    for need in (data / "stage2_1k.json", data / "stage2_two_types.json", data / DETAIL_DIR / "stage2.json",
                 data / "preferences.json", data / "preferences_eval.json", base / "llm" / "config.json"):
        if not need.is_file():
            ap.error(f"{need} is missing: run scripts/demo_ablations.sh (make_shapes --ablation-sets, pretrain_base)")
    out.mkdir(parents=True, exist_ok=True)
    from llava_sft.config import load_config

    lr = load_config(STAGE2, args.stage2).train.lr
    wanted = {v for r in rows for v in (r.baseline, r.ablated, *r.also.values())}
    variants = {k: v for k, v in plan_runs(data, base, lr).items() if k in wanted}
    jobs, evals = make_jobs(variants, args.seeds, data, out, args.stage2, args.stage1, args.stage3)
    t0 = time.time()

    def log(msg: str) -> None:
        print(f"[ablations {time.time() - t0:6.0f} s] {msg}", flush=True)

    log(f"{len(jobs)} jobs ({len(rows)} rows x seeds {args.seeds}), {args.jobs} at a time")
    inputs = inputs_fingerprint(data, base)
    log(f"inputs {inputs} (base models and data, by content: finished runs are reused only for the same)")
    run_jobs(jobs, out, args.jobs, log, inputs)
    results = collect(out, data, jobs, evals, args.seeds, rows)
    results["seconds"] = round(time.time() - t0)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown(results))
    plot(results, out / "results.png")
    print(markdown(results))
    log(f"results in {out / 'results.json'}, {out / 'results.md'}, {out / 'results.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

