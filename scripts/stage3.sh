#!/usr/bin/env bash
# Stage 3 (preference optimisation, DPO: projector + LLM, from the Stage-2 model).
#   bash scripts/stage3.sh [CONFIG] [key=value ...]
#   bash scripts/stage3.sh --preflight [CONFIG] [key=value ...]   # rehearse it on a CPU first (README)
# Default CONFIG: configs/llava_v1_5/stage3_dpo_7b.yaml (RLAIF-V's LLaVA-1.5-7B run; the LoRA variant is
# configs/llava_v1_5/stage3_dpo_7b_lora.yaml). Before the first step the run computes the reference model's
# log-probs once (train/reference.py) and stores them beside the data; reruns and resumes reuse them.
# Paths come from the config, which reads env vars (LLAVA_DATA_ROOT, LLAVA_STAGE2, ...; see README).
# Multi-node: NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, GPUS_PER_NODE (see scripts/_launch.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=configs/llava_v1_5/stage3_dpo_7b.yaml
PREFLIGHT=0; ARGS=()
for a in "$@"; do if [[ "$a" == --preflight ]]; then PREFLIGHT=1; else ARGS+=("$a"); fi; done
set -- "${ARGS[@]+"${ARGS[@]}"}"
if [[ $# -gt 0 && "$1" != *=* && "$1" != --* ]]; then CONFIG=$1; shift; fi
if [[ $PREFLIGHT == 1 ]]; then exec python -m llava_sft.preflight "$CONFIG" "$@"; fi
source scripts/_launch.sh
launch "$CONFIG" "$@"
