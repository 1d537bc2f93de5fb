"""Train a LLaVA model (Stage 1 or Stage 2: the same core, different configs).

Single process:
    python -m llava_sft.train configs/demo/stage1.yaml
    python -m llava_sft.train configs/llava_v1_5/stage2_finetune_7b.yaml train.lr=2e-5 data.max_length=1024
All GPUs of a node (the global batch is kept constant through gradient accumulation):
    torchrun --nproc_per_node 8 -m llava_sft.train configs/llava_v1_5/stage1_pretrain_7b.yaml
or simply `bash scripts/stage1.sh` then `bash scripts/stage2.sh` (README; docs/training.md). With `train.deepspeed=<json>`
(configs/deepspeed/) the same torchrun command trains under DeepSpeed ZeRO-2/3; on a CPU-only machine
DeepSpeed needs DS_ACCELERATOR=cpu (set automatically when unset).

Exit codes: 0 done, 2 config error (or a missing path, another run holding the run directory, or bad samples found
by the start-up check under data.bad_samples=error: the message lists them; or data.template not the tokenizer's own
chat template, data/template_check.py), 3 a non-finite
loss or gradient norm stopped the run (nothing saved from it), 4 a bad sample met at run time under
data.bad_samples=error (the last complete step checkpointed first),
75 pre-empted (SIGTERM or SIGUSR1: a checkpoint of the last finished step was written; run again to resume).
"""
import sys

from llava_sft.config import ConfigError, MissingPathError, load_config

EXIT_NON_FINITE = 3  # a step's loss or gradient norm was not finite (the message names the step and its samples)
EXIT_BAD_SAMPLE = 4  # data.bad_samples=error met a bad sample at run time (a checkpoint of the last step was written)
from llava_sft.preemption import EXIT_PREEMPTED  # noqa: E402,F401 (75: SIGTERM/SIGUSR1, checkpoint written, run again)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    try:
        cfg = load_config(argv[0], argv[1:])
    except (ConfigError, FileNotFoundError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    import os

    import torch.distributed as dist

    from llava_sft.data.catalog import StartupCheckError
    from llava_sft.data.template_check import TemplateMismatch
    from llava_sft.data.templates import BadSampleError
    from llava_sft.train.guards import BadSampleStop, NonFiniteStepError, Preempted
    from llava_sft.train.rundir import RunDirLocked
    from llava_sft.train.trainer import train

    code = 0
    try:
        train(cfg)
    except NonFiniteStepError as e:  # every rank stops at the same step; one line, from rank 0
        if os.environ.get("RANK", "0") == "0":
            print(f"[train] error: {e}", file=sys.stderr)
        code = EXIT_NON_FINITE
    except StartupCheckError as e:  # every rank that met it says it (it may be a node's own)
        print(f"[train] error (rank {os.environ.get('RANK', '0')}): {e}", file=sys.stderr)
        code = 2
    except (RunDirLocked, MissingPathError, BadSampleError, TemplateMismatch) as e:  # found before training: rank 0
        if os.environ.get("RANK", "0") == "0":
            print(f"[train] error: {e}", file=sys.stderr)
        code = 2
    except BadSampleStop as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"[train] error: {e}", file=sys.stderr)
        code = EXIT_BAD_SAMPLE
    except Preempted as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"[train] pre-empted: {e}", file=sys.stderr)
        code = EXIT_PREEMPTED
    if dist.is_initialized():  # torchrun / DeepSpeed: shut the process group down before the interpreter exits
        dist.destroy_process_group()  # (left to interpreter teardown, gloo's threads can abort the process)
    return code


if __name__ == "__main__":
    sys.exit(main())
