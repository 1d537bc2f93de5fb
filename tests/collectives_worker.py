"""One rank of tests/test_collectives.py, started by torchrun: every code path of ours that talks to the other ranks,
run for real under a process group of the backend named on the command line.

    torchrun --nproc_per_node 2 tests/collectives_worker.py BACKEND TOKENIZER_DIR DATA_DIR OUT_DIR

BACKEND "gloo" takes CPU tensors; "cuda:gloo" takes only CUDA tensors, which is NCCL's device map
(`dist.Backend.backend_capability["nccl"] == ["cuda"]`). Each path's outcome goes to OUT_DIR/rank{r}.json:
"ok" (with the values it gave), "ours: ..." (collectives.CollectiveDeviceError: the path asked the group which device
it serves) or "other: ..." (anything else, e.g. c10d's "No backend type associated with device type cpu").
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llava_sft.data.dataset import Collator, SkipReport  # noqa: E402
from llava_sft.train import checkpoint as ckpt  # noqa: E402
from llava_sft.train.collectives import CollectiveDeviceError, agree, sum_over_ranks  # noqa: E402
from llava_sft.train.engines.base import Engine  # noqa: E402
from llava_sft.train.engines.ddp import DDPEngine  # noqa: E402
from llava_sft.train.guards import NonFiniteStepError, stop_if_non_finite  # noqa: E402
from llava_sft.train.measure import peak_memory_gb  # noqa: E402
from llava_sft.train.state import RunState  # noqa: E402
from llava_sft.train.trainer import accumulate_gradients, build, seed_everything  # noqa: E402
from tests.tiny import run_config  # noqa: E402

# the samples of each rank's two micro-batches: uneven counts of supervised tokens (test_collectives checks that
# the two normalisations then differ)
SHARES = {0: [[0, 1], [2, 3]], 1: [[4], [5]]}


def outcome(fn):
    try:
        return {"ok": fn()}
    except CollectiveDeviceError as e:
        return {"ours": str(e)}
    except NonFiniteStepError as e:
        return {"ok": {"non_finite_ids": e.ids}}
    except Exception as e:  # noqa: BLE001 (recorded, the test asserts on it)
        return {"other": f"{type(e).__name__}: {e}"}


def main(backend: str, tokenizer_dir: str, data_dir: str, out_dir: str) -> None:
    dist.init_process_group(backend=backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(out_dir)
    results: dict = {}

    results["sum_over_ranks"] = outcome(lambda: sum_over_ranks([rank + 1, 10 * rank], world))
    results["agree"] = outcome(lambda: agree([rank == 1, False], world))
    results["peak_memory"] = outcome(lambda: peak_memory_gb(torch.device("cpu"), world) > 0)

    def align():  # ZeRO / FSDP2: every rank runs as many forward passes as the busiest
        engine = Engine(None, world, rank)
        engine.equal_forward_passes = True
        micro = [{"input_ids": torch.ones(1, 1)}] * (1 if rank == 0 else 3)
        return len(engine.align(micro))
    results["align"] = outcome(align)

    def non_finite():
        stop_if_non_finite(float("nan"), None, [{"ids": [f"r{rank}"]}], world, applied=False, lr=1e-3)
        return "did not stop"
    results["non_finite"] = outcome(non_finite)

    def checkpoint():
        path = ckpt.save_checkpoint(out / "ckpt", 1, {"step": 1} if rank == 0 else None, 2, {"rank": rank}, rank,
                                    world)
        return sorted(p.name for p in path.iterdir())
    results["checkpoint"] = outcome(checkpoint)

    def reports():
        report = SkipReport()
        state = RunState(SimpleNamespace(), None, SimpleNamespace(report=report), rank, world)
        report.add(f"sample-of-rank-{rank}", "missing image")
        report.truncated = rank + 1
        state.gather_reports()
        return {"skipped": [list(s) for s in report.skipped], "truncated": report.truncated}
    results["gather_reports"] = outcome(reports)

    cfg = run_config(tokenizer_dir, data_dir, out / "run", stage=2, global_batch_size=8, micro_batch_size=2)
    seed_everything(0)
    model, _, dataset = build(cfg, torch.device("cpu"))
    model.set_trainable(True, True)
    collate = Collator(dataset.tokenizer.pad_token_id)
    batches = {r: [collate([dataset[i] for i in share]) for share in shares] for r, shares in SHARES.items()}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def stats():  # the step's statistics, through the loop's own function (no engine wrapping: the model as is)
        engine = DDPEngine(cfg.train, world, rank)
        engine.model = engine.module = model
        one = batches[rank][:1]  # one micro-batch: no DDP no_sync() around the model as is
        return accumulate_gradients(engine, one, torch.device("cpu"), False)["supervised_tokens"]
    results["step_statistics"] = outcome(stats)

    if backend == "gloo":  # the loss weighting of both modes against its formula, through DDP's real all-reduce
        engine = DDPEngine(cfg.train, world, rank)  # one DDP wrapper (a second would add its hooks to the first's)
        engine.setup(model, lambda m: [{"params": [p for _, p in trainable]}], lambda step: 1.0)
        for mode in ("global_tokens", "micro_batch_mean"):
            cfg.train.loss_normalization = mode  # engine.train_cfg is cfg.train
            model.zero_grad(set_to_none=True)
            row = accumulate_gradients(engine, batches[rank], torch.device("cpu"), False)
            got = {n: p.grad.clone() for n, p in trainable}
            # the formula, from every rank's batches in this one process (no collective)
            model.zero_grad(set_to_none=True)
            sums = {(r, i): model(b["input_ids"], b["attention_mask"], b["images"], b["labels"])
                    for r, bs in batches.items() for i, b in enumerate(bs)}
            n_total = sum(int(n) for _, n in sums.values())
            k = len(SHARES[0])
            if mode == "global_tokens":
                objective = sum(loss for loss, _ in sums.values()) / n_total
            else:
                objective = sum(loss / n for loss, n in sums.values()) / (world * k)
            expected = torch.autograd.grad(objective, [p for _, p in trainable])
            torch.save({"got": got, "expected": dict(zip([n for n, _ in trainable], expected, strict=True)),
                        "loss": row["loss"], "objective": objective.item(),
                        "tokens": {f"{r}.{i}": int(n) for (r, i), (_, n) in sums.items()}},
                       out / f"grads_{mode}_rank{rank}.pt")
            model.zero_grad(set_to_none=True)
    (out / f"rank{rank}.json").write_text(json.dumps(results, indent=1))
    dist.barrier() if backend == "gloo" else None
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:5])
