"""The rehearsal and its checks (see the package docstring). Every check is a measured value against its target."""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from llava_sft.config import ConfigError, load_config
from llava_sft.preflight import sizing, twin
from llava_sft.train import memory

REPO = Path(__file__).resolve().parents[2]
RESULT_FILE = "preflight.json"


@dataclass
class Check:
    name: str
    status: str  # PASS | FAIL | WARN
    value: str  # what was measured
    target: str = ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _override(cfg_overrides: dict) -> list[str]:
    return [f"{k}={v}" for k, v in cfg_overrides.items()]


def _deepspeed_json(cfg, out_dir: Path) -> tuple[str | None, int | None]:
    """The recipe's DeepSpeed JSON with bf16 "auto" resolved as on a GPU (DeepSpeed on a CPU would leave it off)."""
    if not cfg.train.deepspeed:
        return None, None
    path = Path(cfg.train.deepspeed)
    if not path.is_file() and (REPO / path).is_file():
        path = REPO / path
    raw = json.loads(path.read_text())
    if raw.get("bf16", {}).get("enabled", "auto") == "auto":
        raw.setdefault("bf16", {})["enabled"] = bool(cfg.train.bf16)
    out = out_dir / f"deepspeed_{path.name}"
    out.write_text(json.dumps(raw, indent=1))
    return str(out), int(raw.get("zero_optimization", {}).get("stage", 0))


def _launch(config: Path, overrides: list[str], nproc: int, stage_script: str, env_extra: dict, log: Path,
            timeout: int) -> int:
    """The recipe's own launcher (scripts/stage*.sh -> scripts/_launch.sh: torchrun for nproc > 1) on the CPU."""
    env = dict(os.environ, GPUS_PER_NODE=str(nproc), MASTER_PORT=str(_free_port()), CUDA_VISIBLE_DEVICES="",
               DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", LLAVA_SKIP_ENVCHECK="1",
               **env_extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    with log.open("w") as f:
        try:
            return subprocess.run(["bash", str(REPO / "scripts" / stage_script), str(config), *overrides], env=env,
                                  stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            return 124


def _rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _tail(log: Path, n: int = 8) -> str:
    """The run's own error line (`[train] error: ...`, or the first exception line of rank 0), else the last lines
    (torchrun's summary after a failure names no cause)."""
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()] if log.is_file() else []
    for pattern in (r"^\[train\] error: ", r"^(\[rank0\]: )?[\w.]*(Error|Exception): "):
        found = [ln for ln in lines if re.search(pattern, ln)]
        if found:
            return re.sub(r"^\[rank\d+\]: ", "", found[0])
    return "\n".join(lines[-n:])


def reference_lrs(base_lr: float, total: int, warmup_ratio: float, schedule: str) -> list[float]:
    """The LR of each optimizer step under transformers' schedules, as HF Trainer builds them (LLaVA's runs)."""
    import torch
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base_lr)
    warmup = math.ceil(total * warmup_ratio)
    make = get_cosine_schedule_with_warmup if schedule == "cosine" else get_constant_schedule_with_warmup
    sched = make(opt, warmup, total) if schedule == "cosine" else make(opt, warmup)
    lrs = []
    for _ in range(total):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return lrs


# ------------------------------------------------------------------------------------------------------- checks
def expected_trainable(cfg, twin_llm: dict, vision_width: int, vision_arch: dict | None = None) -> dict[str, int]:
    """Per module, the parameter count the stage intends to train, from the twin's config (train/memory.py's
    arithmetic -- the same that sizes the real run, so a match also validates it). A trained tower trains what its
    features depend on: patch embedding, CLS and positions, the pre-norm and the blocks up to the selected one
    (not the later blocks, the final norm or CLIP's projection: model/llava.py)."""
    tower = 0
    if cfg.train.train_vision_tower and vision_arch is not None:
        v, layers, layer = vision_arch["vision_cfg"], twin.TWIN_VISION["layers"], cfg.model.vision.select_layer
        used = layers + layer + 1 if layer < 0 else layer
        tower = memory.vit_params(twin.TWIN_VISION["width"], used, v["patch_size"], v["image_size"]) \
            - 2 * twin.TWIN_VISION["width"]  # vit_params counts the final norm, which gets no gradient
    shape = memory.llm_shape(twin_llm)
    if not cfg.train.train_llm:
        llm = 0
    elif cfg.model.lora is None:
        llm = memory.llm_params(shape)
    else:
        llm = memory.lora_params(shape, cfg.model.lora.r)
    proj = sizing.projector_params(cfg.model.projector, vision_width, shape["hidden_size"])
    return {"vision_tower": tower, "projector": proj if cfg.train.train_projector else 0, "llm": llm}


def probe_checks(cfg, facts: list[dict], expected: dict[str, int]) -> tuple[list[Check], bool]:
    f = facts[0]
    m = f["modes"]
    checks = [
        Check("LLM in training mode during the step", "PASS" if m["llm_training"] else "FAIL",
              f"llm.training={m['llm_training']} ({m['llm_modules_in_eval']} LLM modules in eval mode)", "True"),
        Check("vision tower in eval mode", "PASS" if not m["vision_tower_training"] else "FAIL",
              f"vision_tower.training={m['vision_tower_training']}", "False"),
        Check("dropout modules active", "PASS" if m["dropout_active"] == m["dropout_modules"] else "FAIL",
              f"{m['dropout_active']} of {m['dropout_modules']} with p > 0 in training mode", "all")]
    gc = f["gradient_checkpointing"]
    ratio = gc["saved_bytes"] / max(1, gc.get("saved_bytes_flipped", 0))
    if gc["configured"]:
        # a non-reentrant checkpoint hides its layers' saved tensors: with 2 twin layers what remains (the decoder's
        # own norm and rotary tensors) is well under half; a no-op checkpoint measures exactly 1.0
        active = ratio < 0.5
        checks.append(Check("gradient checkpointing active (saved-for-backward bytes, on / off)",
                            "PASS" if active else "FAIL", f"{gc['saved_bytes']:,} / {gc.get('saved_bytes_flipped', 0):,}"
                            f" B = {ratio:.3f}", "< 0.5"))
    else:
        active = False
        checks.append(Check("gradient checkpointing (configured off)", "PASS",
                            f"off / on = {gc['saved_bytes']:,} / {gc.get('saved_bytes_flipped', 0):,} B", "off"))
    for module, want in expected.items():
        got = f["trainable"][module]
        names = got["trainable_names"]
        ok = got["trainable"] == want and (want == 0 or module != "llm" or cfg.model.lora is None
                                           or all("lora_" in n for n in names))
        checks.append(Check(f"trainable parameters: {module}", "PASS" if ok else "FAIL",
                            f"{got['trainable']:,} of {got['total']:,} ({len(names)} tensors)", f"{want:,}"))
    changed = sorted({n for r in facts for n in r["frozen"]["changed"]})
    checks.append(Check("frozen parameters bit-identical after the steps", "FAIL" if changed else "PASS",
                        f"{len(changed)} of {f['frozen']['tensors']} tensors changed" +
                        (f" (e.g. {changed[0]})" if changed else ""), "0 changed"))
    dtypes = sorted({d for r in facts for d in r["master_dtypes"]})
    checks.append(Check("optimizer steps fp32 master weights", "PASS" if dtypes == ["float32"] else "FAIL",
                        ", ".join(dtypes), "float32"))
    return checks, active


def loss_checks(cfg, rows: list[dict], steps: int) -> list[Check]:
    losses = [r["loss"] for r in rows]
    finite = bool(losses) and all(math.isfinite(x) for x in losses)
    falls = finite and len(losses) >= 2 and losses[-1] < losses[0]
    # DPO at its recipes' learning rates (RLAIF-V: 5e-7) moves a loss of ln 2 by less than a 16-bit rounding in a few
    # steps: not falling there is a warning, not a failure; a loss that is not finite fails as always
    quiet = cfg.dpo is not None and finite and cfg.train.lr * steps < 1e-5
    out = [Check("loss finite and falling (same samples every step)", "PASS" if falls else "WARN" if quiet else "FAIL",
                  " -> ".join(f"{x:.5g}" for x in losses) + (
                      f" (lr {cfg.train.lr:g} x {steps} steps: too little to move a DPO loss here)" if quiet and not
                      falls else ""), "finite, last < first")]
    if cfg.dpo is not None and losses:  # step 1: the policy is its reference, z = 0, whatever the loss type
        first = {"sigmoid": math.log(2), "ipo": (1 / (2 * cfg.dpo.beta)) ** 2}[cfg.dpo.loss_type]
        # the reference's numbers come from another batch composition (and, in bf16, other roundings): a side's
        # log-prob may differ by ~0.1 nats in bf16, beta x that moves the loss by ~0.01
        ok = abs(losses[0] - first) <= 0.02 * max(1.0, first) or cfg.dpo.sft_weight > 0
        out.append(Check("DPO: step 1 is the policy against itself", "PASS" if ok else "FAIL", f"{losses[0]:.5g}",
                         f"{first:.5g} (ln 2 for sigmoid)" + (" + the SFT term" if cfg.dpo.sft_weight else "")))
    base = cfg.train.lr if cfg.train.train_llm else (cfg.train.projector_lr or cfg.train.lr)
    want = reference_lrs(base, steps, cfg.train.warmup_ratio, cfg.train.lr_schedule)
    got = [r["lr"] for r in rows]
    same = len(got) == len(want) and all(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-15)
                                         for a, b in zip(got, want, strict=True))
    out.append(Check("LR per step = transformers' schedule", "PASS" if same else "FAIL",
                     ", ".join(f"{x:.3g}" for x in got), ", ".join(f"{x:.3g}" for x in want)))
    return out


# ---------------------------------------------------------------------------------------------------- the run
def notice_check(sized: dict, gpu: str, notice_seconds: float) -> Check:
    """Can a pre-emption checkpoint be written within the notice the cluster gives (docs/training.md, "Pre-emption
    on a cluster")? The step in progress finishes first, then every rank writes."""
    step = sized.get("seconds_per_step", {}).get(gpu, 0.0)
    need = sized["checkpoint_seconds"] + step
    fits = need <= notice_seconds
    return Check(f"pre-emption checkpoint within {notice_seconds:g} s of notice", "PASS" if fits else "WARN",
                 f"{sized['checkpoint_gb']} GB in ~{sized['checkpoint_seconds']:g} s + a step ({step:g} s on {gpu})"
                 + ("" if fits else ": SIGTERM alone (torchrun, KillWait, Kubernetes' default grace: 30 s) would "
                    "lose it; give notice earlier (SLURM --signal=USR1@SECONDS, scripts/slurm/) or a longer grace, "
                    "and pass it as --notice-seconds"), f"<= {notice_seconds:g} s")


def rehearse(config: str, overrides: list[str], nproc: int | None, steps: int, gpu: str, num_gpus: int, mfu: float,
             workdir: Path, timeout: int = 900, notice_seconds: float = 30.0,
             write_gbps: float = sizing.WRITE_GB_PER_S_PER_NODE) -> dict:
    from llava_sft.envcheck import find_traps

    t0 = time.time()
    cfg = load_config(config, overrides)
    checks: list[Check] = []
    for trap in find_traps(cfg):
        if trap.key != "train.device":  # the rehearsal itself runs on the CPU on purpose
            checks.append(Check(f"environment: {trap.key}", "WARN", trap.message))
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    stage_script = "stage3.sh" if cfg.dpo is not None else "stage2.sh" if cfg.train.train_llm else "stage1.sh"
    ds_json, zero_stage = _deepspeed_json(cfg, workdir)
    nproc = nproc or (2 if ds_json else 1)
    micro, accumulation = 2, 2
    global_batch = nproc * micro * accumulation

    # twins: data first (a stand-in tokenizer learns its text), then tokenizer, LLM, vision tower
    data_over, data_source, texts = twin.make_data(cfg, global_batch, workdir)
    real_llm, llm_source = twin.real_llm_config(cfg.model.llm.path or "")
    tokenizer, tok_source = twin.make_tokenizer(cfg, texts, workdir)
    vocab = real_llm["vocab_size"] if twin.real_tokenizer_dir(cfg) else len(tokenizer)
    llm_dir, twin_llm = twin.make_llm_twin(real_llm, tokenizer, workdir / "llm", vocab)
    vision_over = twin.make_vision_twin(cfg.model.vision, workdir)
    vision_arch = twin.real_vision_shape(cfg.model.vision)
    run_dir = workdir / "run"
    over = {**data_over, **vision_over, "model.llm.path": str(llm_dir), "model.tokenizer": "null",
            "model.llm.attn_implementation": "sdpa", "train.device": "cpu", "train.output_dir": str(run_dir),
            "train.global_batch_size": global_batch, "train.micro_batch_size": micro, "train.max_steps": steps,
            "train.save_every": steps - 1, "train.keep_last": 1, "train.resume": "never", "train.tensorboard": "false",
            "train.wandb_project": "null", "data.num_workers": min(1, cfg.data.num_workers)}
    if ds_json:
        over["train.deepspeed"] = ds_json
    if cfg.train.pretrained_projector:  # Stage 2 starts from a Stage-1 output written by the Stage-1 code path
        over["train.pretrained_projector"] = str(_stage1_output(cfg, overrides, config, over, workdir))
    checks.append(Check("twins built", "PASS", f"LLM {twin_llm['model_type']} ({llm_source}); tokenizer: {tok_source}; "
                        f"vision {vision_over['model.vision.model']}; data: {data_source}"))

    probe_file = workdir / "probe.json"
    log = workdir / "rehearsal.log"
    rc = _launch(Path(config).resolve(), overrides + _override(over), nproc, stage_script,
                 {"LLAVA_SFT_PROBE": str(probe_file)}, log, timeout)
    rows = _rows(run_dir)
    checks.append(Check(f"rehearsal ran ({stage_script}, {nproc} process(es), {steps} steps)",
                        "PASS" if rc == 0 and len(rows) == steps else "FAIL", f"exit {rc}, {len(rows)} steps" +
                        ("" if rc == 0 else f" ({log}): {_tail(log)}")))
    facts = [json.loads(p.read_text()) for p in sorted(workdir.glob("probe.json.rank*"))]
    active = True
    if rc != 0 and rows:  # e.g. stopped by a non-finite loss: the losses it logged are the finding
        checks += loss_checks(cfg, rows, steps)[:1]
    if rc == 0 and facts:
        probe, active = probe_checks(cfg, facts, expected_trainable(cfg, twin_llm, twin.TWIN_VISION["width"], vision_arch))
        checks += probe + loss_checks(cfg, rows, steps)
        checks.append(_resume_check(config, overrides, over, nproc, stage_script, workdir, rows, steps, timeout))
        if not cfg.train.train_llm:
            checks.append(_projector_accepted(run_dir))
    sized = sizing.size(cfg, real_llm, vision_arch, zero_stage, active, num_gpus, mfu, None, write_gbps)
    checks.append(notice_check(sized, gpu, notice_seconds))
    g = sized["gpus"][gpu]
    fix = f"; lower train.micro_batch_size to {g['largest_micro_batch_that_fits']}" if not g["fits"] else ""
    checks.append(Check(f"projected peak memory per GPU on {gpu} ({sized['engine']}, {num_gpus} GPUs)",
                        "PASS" if g["fits"] else "FAIL", f"{g['peak_gib']} GiB{fix}",
                        f"<= 90 % of {memory.GPUS[gpu].memory_gib:g} GiB"))
    return {"config": config, "overrides": overrides, "checks": [asdict(c) for c in checks], "sizing": sized,
            "gpu": gpu, "workdir": str(workdir), "seconds": round(time.time() - t0, 1),
            "passed": all(c.status != "FAIL" for c in checks)}


def _stage1_output(cfg, overrides, config, over: dict, workdir: Path) -> Path:
    """A Stage-1 output (llava_config.json + projector.safetensors) from the Stage-1 writer, for the twin."""
    import torch

    from llava_sft.model.llava import LlavaModel

    twin_cfg = load_config(config, overrides + _override({k: v for k, v in over.items() if k.startswith("model.")}))
    torch.manual_seed(1)
    model = LlavaModel(twin_cfg.model)
    out = workdir / "stage1_projector"
    model.save_projector(out, {"template": "plain"})
    return out


def _projector_accepted(run_dir: Path) -> Check:
    """The Stage-1 output loads as a Stage-2 run's train.pretrained_projector (LlavaModel.load_projector)."""
    from llava_sft.config import from_dict
    from llava_sft.model.llava import CONFIG_FILE, LlavaModel, ModelConfig

    try:
        saved = json.loads((run_dir / CONFIG_FILE).read_text())
        model = LlavaModel(from_dict(ModelConfig, saved["model"], where="model"))
        model.load_projector(run_dir)
        return Check("Stage-1 output accepted as Stage 2's train.pretrained_projector", "PASS", str(run_dir))
    except Exception as e:  # noqa: BLE001 -- any failure is the finding
        return Check("Stage-1 output accepted as Stage 2's train.pretrained_projector", "FAIL", f"{type(e).__name__}: {e}")


def _resume_check(config, overrides, over, nproc, stage_script, workdir: Path, rows, steps, timeout) -> Check:
    """Resume from the step (K-1) checkpoint in a fresh run directory: the next loss must equal the first run's."""
    ckpt = Path(over["train.output_dir"]) / "checkpoints" / f"step_{steps - 1}"
    resumed = workdir / "resumed"
    log = workdir / "resume.log"
    rc = _launch(Path(config).resolve(), overrides + _override({**over, "train.output_dir": str(resumed),
                                                                 "train.resume": str(ckpt)}),
                 nproc, stage_script, {}, log, timeout)
    again = _rows(resumed)
    if rc != 0 or not again:
        return Check("checkpoint resumes to the same next loss", "FAIL", f"exit {rc} ({log}): {_tail(log)}")
    a, b = again[-1]["loss"], rows[-1]["loss"]
    # the same kernels on the same machine from the same state: equal up to the last printed digit (6 decimals)
    ok = again[-1]["step"] == steps and math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6)
    return Check("checkpoint resumes to the same next loss", "PASS" if ok else "FAIL",
                 f"step {again[-1]['step']}: {a:.6f} vs {b:.6f}", "equal")


def format_table(result: dict) -> str:
    width = max(len(c["name"]) for c in result["checks"])
    lines = [f"preflight {result['config']} {' '.join(result['overrides'])}".rstrip()]
    for c in result["checks"]:
        target = f"  (target {c['target']})" if c["target"] else ""
        lines.append(f"  {c['status']:<4}  {c['name']:<{width}}  {c['value']}{target}")
    lines.append(sizing.sizing_table(result["sizing"], result["gpu"]))
    verdict = "PASSED" if result["passed"] else "FAILED"
    lines.append(f"preflight {verdict} in {result['seconds']} s (rehearsal files in {result['workdir']}). "
                 "Not checked on a CPU: GPU kernels (flash-attn), NCCL, real throughput.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llava_sft.preflight", description=__doc__)
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*", help="key=value, as for llava_sft.train")
    ap.add_argument("--nproc", type=int, default=None, help="CPU processes (default: 2 under DeepSpeed, else 1)")
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps of the rehearsal (>= 3)")
    ap.add_argument("--gpu", default="A100-80GB", choices=sorted(memory.GPUS), help="the card to size for")
    ap.add_argument("--num-gpus", type=int, default=8, help="GPUs of the real run (default: one 8-GPU node)")
    ap.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation assumed for the hours")
    ap.add_argument("--workdir", default=None, help="where the twins and runs go (default checkpoints/preflight/"
                    "<run_name>)")
    ap.add_argument("--json", default=None, help="write the table as JSON here")
    ap.add_argument("--notice-seconds", type=float, default=30.0, help="seconds between the pre-emption notice and "
                    "SIGKILL on your cluster (default 30: SIGTERM alone; SLURM --signal=USR1@N gives N)")
    ap.add_argument("--write-gbps", type=float, default=sizing.WRITE_GB_PER_S_PER_NODE,
                    help="checkpoint write speed per node, GB/s (default: 1, a shared file system)")
    args = ap.parse_intermixed_args(argv)  # overrides may come after the options, as the launchers pass them
    if args.steps < 3:
        ap.error("--steps must be at least 3 (a warmup step, a step with the LR on, and one to resume)")
    try:
        name = load_config(args.config, args.overrides).run_name
        workdir = Path(args.workdir or REPO / "checkpoints" / "preflight" / name).resolve()
        result = rehearse(args.config, args.overrides, args.nproc, args.steps, args.gpu, args.num_gpus, args.mfu,
                          workdir, notice_seconds=args.notice_seconds, write_gbps=args.write_gbps)
    except (ConfigError, twin.PreflightError, FileNotFoundError, ValueError) as e:
        print(f"[preflight] error: {e}", file=sys.stderr)
        return 2
    print(format_table(result))
    (workdir / RESULT_FILE).write_text(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0 if result["passed"] else 1
