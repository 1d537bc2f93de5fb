#!/bin/bash
# GQA testdev-balanced (LLaVA scripts/v1_5/eval/gqa.sh).
#   bash scripts/eval/gqa.sh MODEL_DIR [RESULTS_DIR]   (environment: see scripts/eval/_common.sh)
source "$(dirname "$0")/_common.sh"

D="$EVAL/gqa"
need "$D/llava_gqa_testdev_balanced.jsonl" "$D/data/images"
run_answers gqa --questions "$D/llava_gqa_testdev_balanced.jsonl" --image-folder "$D/data/images"
GT="$D/data/testdev_balanced_questions.json"
[[ -f "$GT" ]] || GT=""
python -m llava_sft.eval.score gqa --answers "$RESULTS_DIR/answers/gqa.jsonl" ${GT:+--annotations "$GT"} \
  --submission "$RESULTS_DIR/upload/gqa_testdev_balanced_predictions.json" --out "$(out_json gqa "$GT")"
