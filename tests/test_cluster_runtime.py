"""Pre-emption and several nodes as a cluster delivers them, through `scripts/stage2.sh` (envcheck, then
llava_sft.launch: torchrun with two ranks on the CPU), DataLoader workers on.

A cluster's notice does not reach one process: SLURM signals every process of the job step (the launcher, each rank
and each rank's DataLoader workers), torchrun answers a SIGTERM by signalling each rank's whole process group,
Kubernetes signals the container's first process. Before issue 38 a SIGTERM killed the loader workers and the rank
died of "DataLoader worker ... is killed by signal: Terminated" (exit 1, no checkpoint), and SIGUSR1 killed torchrun
(exit 138). Here each notice must leave a complete checkpoint of the last finished step and exit 75, and the same
command must then finish with the per-step losses of an uninterrupted run.

The two "nodes" are two launchers on this machine (NNODES=2, NODE_RANK=0/1, one rank each, static rendezvous on
127.0.0.1): the same losses as one node with two ranks, and a resume after both are killed.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from data_prep.make_shapes import generate as make_shapes
from llava_sft.config import save_config
from llava_sft.launch import preempted, rank_processes
from llava_sft.train import checkpoint as ckpt
from tests.tiny import run_config

REPO = Path(__file__).resolve().parents[1]
STEPS = 24


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cluster_data")
    make_shapes(out, seed=4, image_size=32, n_stage1=4, n_stage2=96, n_eval=2, text_only_frac=0.25)
    return out


def config(tokenizer_dir, data_dir, tmp_path: Path, name: str, **train) -> tuple[Path, Path]:
    out = tmp_path / name
    cfg = run_config(tokenizer_dir, data_dir, out, stage=2, max_steps=STEPS, global_batch_size=8,
                     micro_batch_size=2, seed=5, save_every_minutes=0, **train)
    cfg.data.num_workers = 2  # as every recipe has them (4 there): the processes a group signal reaches
    cfg.data.group_by_modality = True
    path = tmp_path / f"{name}.yaml"
    save_config(cfg, path)
    return path, out


def stage2(config_path: Path, port: int, nnodes: int = 1, node_rank: int = 0, cache: Path | None = None,
           ) -> subprocess.Popen:
    """`bash scripts/stage2.sh CONFIG` as a user runs it, in a session of its own (its process group)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO),
               GPUS_PER_NODE=str(2 // nnodes), NNODES=str(nnodes), NODE_RANK=str(node_rank),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if cache is not None:
        env["LLAVA_SFT_CACHE"] = str(cache)  # each "node" its own disk
    return subprocess.Popen(["bash", "scripts/stage2.sh", str(config_path)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 400) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def descendants(pid: int) -> list[int]:
    found, frontier = [], [pid]
    while frontier:
        children = [c for p in frontier for c in _children(p)]
        found += children
        frontier = children
    return found


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while len(rows(run_dir)) < step and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None and len(rows(run_dir)) >= step, "the run ended (or stalled) before the signal"


@pytest.fixture(scope="module")
def reference(llama_tokenizer_dir, data_dir, tmp_path_factory) -> list[float]:
    """The per-step losses of an uninterrupted run: one node, two ranks."""
    path, out = config(llama_tokenizer_dir, data_dir, tmp_path_factory.mktemp("reference"), "run")
    code, log = finish(stage2(path, 29641))
    assert code == 0, log[-4000:]
    assert "[launch] torchrun: 1 node(s) x 2 GPU(s)" in log
    losses = [r["loss"] for r in rows(out)]
    assert len(losses) == STEPS
    return losses


def preempt_and_resume(tokenizer_dir, data_dir, tmp_path, reference, port: int, deliver) -> str:
    path, out = config(tokenizer_dir, data_dir, tmp_path, "run")
    proc = stage2(path, port)
    wait_for_step(proc, out, 3)
    signalled = deliver(proc.pid)
    code, log = finish(proc, 200)
    assert code == 75, log[-4000:]
    assert "DataLoader worker" not in log and "killed by signal" not in log, log[-4000:]
    saved = ckpt.list_checkpoints(out / "checkpoints")
    assert len(saved) == 1 and (saved[0] / "DONE").is_file(), saved
    step = int(saved[0].name.split("_")[1])
    assert 3 <= step < STEPS and sorted(p.name for p in saved[0].iterdir()) == ["DONE", "rank0.pt", "rank1.pt",
                                                                                 "state.pt"]
    assert [r["step"] for r in rows(out)] == list(range(1, step + 1))  # the last finished step is the checkpoint's
    assert not (out / "report.json").exists()
    code, log2 = finish(stage2(path, port))  # the same command again
    assert code == 0, log2[-4000:]
    assert f"resumed from {saved[0]}" in log2
    assert [r["loss"] for r in rows(out)] == reference
    return f"{signalled}\n{log}"


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_to_every_process_of_the_job_checkpoints_exits_75_and_resumes_exactly(
        llama_tokenizer_dir, data_dir, tmp_path, reference, sig):
    """SLURM: the notice (SIGUSR1 with --signal=USR1@T, SIGTERM at the end) reaches every process of the step:
    the launcher, both ranks and their loader workers."""
    def every_process(launcher: int) -> int:
        everyone = [launcher] + descendants(launcher)
        assert len(everyone) >= 1 + 2 + 2 * 2, everyone  # launcher, 2 ranks, 2 loader workers each (at least)
        for pid in everyone:
            os.kill(pid, sig)
        return len(everyone)

    log = preempt_and_resume(llama_tokenizer_dir, data_dir, tmp_path, reference, 29642 + sig, every_process)
    assert f"[launch] pre-empted ({sig.name}" in log


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigterm_to_the_launcher_alone_reaches_the_ranks_and_waits_past_torchruns_30_s(
        llama_tokenizer_dir, data_dir, tmp_path, reference):
    """Kubernetes: SIGTERM to the container's first process only. The launcher passes it on to the ranks and waits
    for their checkpoint however long it takes: here one rank is frozen (SIGSTOP, a slow checkpoint write) for 35 s
    after the notice, past the 30 s after which torchrun's own answer SIGKILLs every rank."""
    def launcher_only(launcher: int) -> int:
        ranks = rank_processes(launcher)
        assert len(ranks) == 2
        os.kill(ranks[1], signal.SIGSTOP)
        os.kill(launcher, signal.SIGTERM)
        time.sleep(35)
        os.kill(ranks[1], signal.SIGCONT)
        return 1

    log = preempt_and_resume(llama_tokenizer_dir, data_dir, tmp_path, reference, 29660, launcher_only)
    assert "[launch] SIGTERM: passed on to 2 rank(s)" in log


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_nodes_train_like_one_node_of_two_ranks_through_a_kill_and_a_preemption(llama_tokenizer_dir, data_dir,
                                                                                    tmp_path, reference):
    """Two launchers (NNODES=2, NODE_RANK=0/1, one rank each): killed outright (a node failure, no notice), then
    restarted, then pre-empted by SLURM's SIGUSR1 to every process on both nodes, then restarted to the end: the
    per-step losses of one node with two ranks."""
    path, out = config(llama_tokenizer_dir, data_dir, tmp_path, "run", save_every=4)
    caches = [tmp_path / f"node{n}_cache" for n in range(2)]

    def start(port: int) -> list[subprocess.Popen]:
        return [stage2(path, port, nnodes=2, node_rank=n, cache=caches[n]) for n in range(2)]

    def signal_all(nodes, sig) -> None:
        for node in nodes:
            for pid in [node.pid] + descendants(node.pid):
                os.kill(pid, sig)

    nodes = start(29670)
    wait_for_step(nodes[0], out, 6)
    signal_all(nodes, signal.SIGKILL)
    for node in nodes:
        node.wait()
    killed_at = ckpt.list_checkpoints(out / "checkpoints")[-1]
    assert int(killed_at.name.split("_")[1]) >= 4

    nodes = start(29671)
    wait_for_step(nodes[0], out, 10)
    signal_all(nodes, signal.SIGUSR1)
    results = [finish(node) for node in nodes]
    assert [code for code, _ in results] == [75, 75], results[0][1][-3000:] + results[1][1][-3000:]
    assert f"resumed from {killed_at}" in results[0][1]
    preempted_at = ckpt.list_checkpoints(out / "checkpoints")[-1]
    assert int(preempted_at.name.split("_")[1]) >= 10

    results = [finish(node) for node in start(29672)]
    for code, log in results:
        assert code == 0, log[-4000:]
    assert "[launch] torchrun: 2 node(s) x 1 GPU(s), node rank 1" in results[1][1]
    # per-node work logged by each node's first rank (its start-up check); global work by global rank 0 only
    assert "start-up check from the cache" in results[1][1] and "start-up check from the cache" in results[0][1]
    assert "saved model" in results[0][1] and "saved model" not in results[1][1]
    assert f"resumed from {preempted_at}" in results[0][1]
    assert [r["loss"] for r in rows(out)] == reference  # 2 nodes x 1 rank == 1 node x 2 ranks, through both stops
    for cache in caches:  # the start-up check ran on each node, into that node's cache
        assert list((cache / "startup").iterdir()), cache


def test_the_launchers_exit_status_says_preempted_only_when_the_ranks_were():
    assert preempted([75, 75], signalled=True)
    assert preempted([75, -signal.SIGTERM], signalled=False)  # torchrun stopped the other rank after the first 75
    assert preempted([-signal.SIGTERM, -signal.SIGTERM], signalled=True)  # stopped before a step had finished
    assert not preempted([-signal.SIGTERM], signalled=False)  # killed by someone else: not a notice we passed on
    assert not preempted([75, 1], signalled=True)  # a rank crashed: that is the error to see
    assert not preempted([3], signalled=True)


@pytest.mark.latest_stack
def test_the_launcher_finds_torchruns_terminate_handler():
    """llava_sft.launch wraps torchrun's SIGTERM handler by its module-level name (read when torchrun starts its
    workers): a torch release that renames it must fail here, not on a cluster."""
    import torch.distributed.elastic.multiprocessing.api as elastic

    assert callable(elastic._terminate_process_handler)
