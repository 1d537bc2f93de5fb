"""Preflight: a dress rehearsal of a recipe on a CPU in minutes, before the cluster run.

    python -m llava_sft.preflight CONFIG [key=value ...] [--nproc N] [--steps K] [--gpu NAME] [--json OUT]
    bash scripts/stage1.sh --preflight [CONFIG] [key=value ...]

The recipe runs exactly as scripts/stage*.sh launch it (same YAML and overrides, same launcher, the recipe's
DeepSpeed JSON over gloo with bf16 as on a GPU, same dtype, checkpointing, template and schedule) with every
component swapped for a shrunk twin of the same kind and on-disk layout (twin.py); the run is measured from
inside (train/probe.py) and the recipe is sized at its real shapes (sizing.py). rehearse.py holds the checks.
"""
