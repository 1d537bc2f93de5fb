"""benchmarks/gpu_check.sh waits for the day a GPU is lent; its code path runs here at tiny shapes on the CPU
(`--smoke`), so that the day comes with a script that works: the packed == unpacked comparison, a Stage-2 step
through the real trainer from an LLM directory, the packing benchmark and the same step without checkpointing, with one JSON of results."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # multi-process or full runs: `pytest -m 'not slow'` skips them

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_script_runs_end_to_end_at_tiny_shapes(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--smoke", "--work", str(tmp_path / "work"),
                           "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false"))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    packed = result["packed_equals_unpacked"]
    assert packed["ok"] and packed["max_abs_diff"] <= 1e-4 * max(1.0, packed["max_abs_logit"])  # fp32 on the CPU
    step = result["stage2_step"]
    assert step["ok"] and step["peak_mem_gb"] > 0 and step["tokens_per_s"] > 0
    assert result["packing_throughput"]["ok"] and result["packing_throughput"]["ratio"] > 0
    assert result["checkpointing_memory"]["ok"] and result["checkpointing_memory"]["peak_mem_gb_off"] > 0
    assert "gpu_check.py" in (REPO / "benchmarks" / "gpu_check.sh").read_text()
