#!/usr/bin/env bash
# The checks that need a GPU, in one command (< 10 minutes on one GPU): flash-attn varlen packed == unpacked in
# bf16, a Stage-2 step at the 7B layer shape through the trainer (peak memory vs prediction, MFU), packed/padded
# throughput; with 2+ GPUs, our collectives under NCCL. Prints one table and writes gpu_check.json (or $1). See benchmarks/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
export TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# with two or more GPUs: our collectives under a real NCCL group (benchmarks/nccl_check.py; skipped on one GPU)
timeout 300 "${PYTHON:-python3}" benchmarks/nccl_check.py || echo "[gpu_check] nccl_check FAILED (above)"
exec timeout 600 "${PYTHON:-python3}" benchmarks/gpu_check.py --json "${1:-gpu_check.json}"
