#!/usr/bin/env bash
# Stage 1 (feature alignment: projector only).
#   bash scripts/stage1.sh [CONFIG] [key=value ...]
#   bash scripts/stage1.sh --preflight [CONFIG] [key=value ...]   # rehearse it on a CPU first (README)
# Default CONFIG: configs/llava_v1_5/stage1_pretrain_7b.yaml (the LLaVA-1.5-7B recipe).
# Paths come from the config, which reads env vars (LLAVA_DATA_ROOT, LLAVA_LLM, ...; see README).
# Multi-node: NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, GPUS_PER_NODE (see scripts/_launch.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=configs/llava_v1_5/stage1_pretrain_7b.yaml
# --preflight (anywhere): rehearse this recipe on a CPU instead (python -m llava_sft.preflight; its options pass through)
PREFLIGHT=0; ARGS=()
for a in "$@"; do if [[ "$a" == --preflight ]]; then PREFLIGHT=1; else ARGS+=("$a"); fi; done
set -- "${ARGS[@]+"${ARGS[@]}"}"
if [[ $# -gt 0 && "$1" != *=* && "$1" != --* ]]; then CONFIG=$1; shift; fi
if [[ $PREFLIGHT == 1 ]]; then exec python -m llava_sft.preflight "$CONFIG" "$@"; fi
source scripts/_launch.sh
launch "$CONFIG" "$@"
