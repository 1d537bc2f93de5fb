#!/bin/bash
# POPE (COCO) (LLaVA scripts/v1_5/eval/pope.sh).
#   bash scripts/eval/pope.sh MODEL_DIR [RESULTS_DIR]   (environment: see scripts/eval/_common.sh)
source "$(dirname "$0")/_common.sh"

D="$EVAL/pope"
need "$D/llava_pope_test.jsonl" "$D/val2014" "$D/coco"
run_answers pope --questions "$D/llava_pope_test.jsonl" --image-folder "$D/val2014"
python -m llava_sft.eval.score pope --answers "$RESULTS_DIR/answers/pope.jsonl" --questions "$D/llava_pope_test.jsonl" \
  --annotations "$D/coco" --out "$RESULTS_DIR/pope.json"
