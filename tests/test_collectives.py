"""Our collectives under the runtime a GPU cluster has: a process group whose backend serves only CUDA tensors, as
NCCL does, and the loss weighting of both train.loss_normalization modes across two ranks.

Every multi-GPU run of every recipe once stopped at its first step: the step's statistics and `align`'s count were
CPU tensors handed to NCCL (issue 38). gloo takes CPU tensors, so CPU tests never saw it. Here each path of ours
that talks to the other ranks runs for real (tests/collectives_worker.py, two ranks under torchrun) under
`backend="cuda:gloo"`, whose device map is exactly NCCL's: each must ask the group which device it serves
(collectives.comm_device), which on this GPU-less machine is our clear CollectiveDeviceError -- never c10d's "No
backend type associated with device type cpu", which is what the code before collectives.py gave at every path.
What only a machine with two GPUs can show: the same paths completing under NCCL (benchmarks/gpu_check.sh).
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_prep.make_shapes import generate as make_shapes

pytestmark = pytest.mark.slow  # two processes under torchrun

REPO = Path(__file__).resolve().parents[1]
PATHS = ("sum_over_ranks", "agree", "peak_memory", "align", "non_finite", "checkpoint", "gather_reports",
         "step_statistics")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("collectives_data")
    make_shapes(out, seed=3, image_size=32, n_stage1=4, n_stage2=12, n_eval=2, text_only_frac=0.0)
    return out


def run_ranks(backend: str, tokenizer_dir, data_dir, out: Path, port: int) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(REPO / "tests" / "collectives_worker.py"), backend, str(tokenizer_dir), str(data_dir), str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=280, cwd=REPO)
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.timeout(300)
def test_every_collective_asks_the_group_which_device_it_serves_as_nccl_requires(llama_tokenizer_dir, data_dir,
                                                                                 tmp_path):
    ranks = run_ranks("cuda:gloo", llama_tokenizer_dir, data_dir, tmp_path, 29631)
    for rank, results in enumerate(ranks):
        assert set(results) == set(PATHS)
        for path, outcome in results.items():
            # "ours": the path put its tensor where the group says (cuda here, which this machine lacks)
            assert list(outcome) == ["ours"], (rank, path, outcome)
            assert "takes only cuda tensors" in outcome["ours"]


@pytest.mark.timeout(300)
def test_collectives_give_the_right_values_and_both_loss_weightings_their_formulas(llama_tokenizer_dir, data_dir,
                                                                                 tmp_path):
    ranks = run_ranks("gloo", llama_tokenizer_dir, data_dir, tmp_path, 29632)
    for results in ranks:
        assert {p: list(o) for p, o in results.items()} == {p: ["ok"] for p in PATHS}, results
        r = {p: o["ok"] for p, o in results.items()}
        assert r["sum_over_ranks"] == [1 + 2, 0 + 10]
        assert r["agree"] == [True, False]  # true on one rank -> true on both
        assert r["align"] == 3  # rank 0's one micro-batch padded to rank 1's three
        assert sorted(r["non_finite"]["non_finite_ids"]) == ["r0", "r1"]  # both ranks' samples named
        assert r["checkpoint"] == ["DONE", "rank0.pt", "rank1.pt", "state.pt"]
        assert sorted(s[0] for s in r["gather_reports"]["skipped"]) == ["sample-of-rank-0", "sample-of-rank-1"]
        assert r["gather_reports"]["truncated"] == 3
    grads = {mode: torch.load(tmp_path / f"grads_{mode}_rank0.pt") for mode in ("global_tokens", "micro_batch_mean")}
    tokens = grads["global_tokens"]["tokens"]
    # uneven supervised-token counts over micro-batches and ranks: the two weightings differ (checked below)
    assert sum(tokens[k] for k in ("0.0", "0.1")) != sum(tokens[k] for k in ("1.0", "1.1")), tokens
    for mode, g in grads.items():
        # fp32 sums of a few hundred token losses in another order: ~1e-6 relative; 1e-4 leaves a margin
        assert g["loss"] == pytest.approx(g["objective"], rel=1e-4), mode
        for name, expected in g["expected"].items():
            assert torch.allclose(g["got"][name], expected, rtol=1e-4, atol=1e-7), (mode, name)
    a, b = (grads[m]["expected"] for m in ("global_tokens", "micro_batch_mean"))
    assert any(not torch.allclose(a[n], b[n], rtol=1e-2) for n in a)


def test_no_collective_outside_collectives_py():
    """Every collective of ours goes through llava_sft/train/collectives.py (the one place that knows the device a
    backend serves). The engines' libraries (DDP, DeepSpeed, FSDP2) issue their own, on the model's device."""
    names = {"all_reduce", "all_gather", "all_gather_object", "broadcast", "broadcast_object_list", "barrier",
             "reduce", "gather", "scatter", "all_to_all", "reduce_scatter"}
    offenders = []
    for file in (REPO / "llava_sft").rglob("*.py"):
        if file.name == "collectives.py":
            continue
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in names and isinstance(node.value, (ast.Name,
                                                                                                ast.Attribute)):
                base = node.value.id if isinstance(node.value, ast.Name) else node.value.attr
                if base in ("dist", "distributed"):
                    offenders.append(f"{file.relative_to(REPO)}:{node.lineno} {base}.{node.attr}")
    assert not offenders, offenders
