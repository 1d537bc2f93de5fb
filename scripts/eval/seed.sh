#!/bin/bash
# SEED-Bench (LLaVA scripts/v1_5/eval/seed.sh): image accuracy (SEED-IMG) + upload file.
#   bash scripts/eval/seed.sh MODEL_DIR [RESULTS_DIR]   (environment: see scripts/eval/_common.sh)
source "$(dirname "$0")/_common.sh"

D="$EVAL/seed_bench"
need "$D/llava-seed-bench.jsonl" "$D/SEED-Bench.json"
run_answers seed --questions "$D/llava-seed-bench.jsonl" --image-folder "$D"
python -m llava_sft.eval.score seed --answers "$RESULTS_DIR/answers/seed.jsonl" --annotations "$D/SEED-Bench.json" \
  --submission "$RESULTS_DIR/upload/seed.jsonl" --out "$RESULTS_DIR/seed.json"
