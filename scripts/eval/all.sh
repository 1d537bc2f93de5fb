#!/bin/bash
# All LLaVA-1.5 benchmarks for one model, then the paper table (python -m llava_sft.eval.report).
#   bash scripts/eval/all.sh MODEL_DIR [RESULTS_DIR]
# BENCHMARKS="pope mme ..." picks a subset; a failing benchmark is reported and the others still run.
set -uo pipefail
if [[ $# -lt 1 ]]; then echo "usage: bash $0 MODEL_DIR [RESULTS_DIR]" >&2; exit 2; fi
HERE=$(cd "$(dirname "$0")" && pwd)
MODEL_DIR=${1%/}
RESULTS_DIR=${2:-checkpoints/eval/$(basename "$MODEL_DIR")}
export PYTHONPATH="$(cd "$HERE/../.." && pwd)${PYTHONPATH:+:$PYTHONPATH}"
FAILED=()
for NAME in ${BENCHMARKS:-vqav2 gqa vizwiz sqa textvqa pope mme mmbench mmbench_cn seed llavabench mmvet}; do
  echo "=================== $NAME"
  bash "$HERE/$NAME.sh" "$MODEL_DIR" "$RESULTS_DIR" || FAILED+=("$NAME")
done
python -m llava_sft.eval.report "$RESULTS_DIR" --name "$(basename "$MODEL_DIR")"
if [[ ${#FAILED[@]} -gt 0 ]]; then
  echo "failed: ${FAILED[*]}" >&2
  exit 1
fi
