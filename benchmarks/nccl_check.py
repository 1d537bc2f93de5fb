"""Our collectives under a real NCCL process group: every path of tests/collectives_worker.py (the step's
statistics, agreement, align, non-finite ids, checkpoint barriers, gathered reports) on two GPUs. CPU tests emulate
NCCL's device map (`cuda:gloo`, tests/test_collectives.py); only this shows the paths completing.

    python benchmarks/nccl_check.py            # needs 2 GPUs (NCCL refuses two ranks on one GPU)
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    if torch.cuda.device_count() < 2:
        print(f"[nccl_check] skipped: {torch.cuda.device_count()} GPU(s) visible, two needed")
        return 0
    from data_prep.make_shapes import generate as make_shapes
    from llava_sft.data.tokenizer_train import demo_corpus, train_llama_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tokenizer = train_llama_tokenizer(demo_corpus(400), root / "tokenizer")
        make_shapes(root / "data", seed=3, image_size=32, n_stage1=4, n_stage2=12, n_eval=2, text_only_frac=0.0)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               str(REPO / "tests" / "collectives_worker.py"), "nccl", str(tokenizer), str(root / "data"),
               str(root / "out")]
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            print(done.stderr[-3000:])
            return 1
        ranks = [json.loads((root / "out" / f"rank{r}.json").read_text()) for r in range(2)]
    bad = {(r, path): outcome for r, results in enumerate(ranks) for path, outcome in results.items()
           if list(outcome) != ["ok"]}
    for r, results in enumerate(ranks):
        for path, outcome in results.items():
            print(f"[nccl_check] rank {r} {path:<16} {json.dumps(outcome)[:100]}")
    print(f"[nccl_check] {'PASS' if not bad else 'FAIL'}: {len(bad)} path(s) failed under NCCL")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
