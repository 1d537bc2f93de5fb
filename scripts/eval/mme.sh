#!/bin/bash
# MME (LLaVA scripts/v1_5/eval/mme.sh): perception score; eval_tool answer files in RESULTS_DIR/upload/mme.
#   bash scripts/eval/mme.sh MODEL_DIR [RESULTS_DIR]   (environment: see scripts/eval/_common.sh)
source "$(dirname "$0")/_common.sh"

D="$EVAL/MME"
need "$D/llava_mme.jsonl" "$D/MME_Benchmark_release_version"
run_answers mme --questions "$D/llava_mme.jsonl" --image-folder "$D/MME_Benchmark_release_version"
python -m llava_sft.eval.score mme --answers "$RESULTS_DIR/answers/mme.jsonl" \
  --annotations "$D/MME_Benchmark_release_version" --submission "$RESULTS_DIR/upload/mme" --out "$RESULTS_DIR/mme.json"
