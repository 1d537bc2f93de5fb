#!/bin/bash
# VizWiz test (LLaVA scripts/v1_5/eval/vizwiz.sh): upload file; local accuracy only with VIZWIZ_ANNOTATIONS (val).
#   bash scripts/eval/vizwiz.sh MODEL_DIR [RESULTS_DIR]   (environment: see scripts/eval/_common.sh)
source "$(dirname "$0")/_common.sh"

D="$EVAL/vizwiz"
need "$D/llava_test.jsonl" "$D/test"
run_answers vizwiz --questions "$D/llava_test.jsonl" --image-folder "$D/test"
python -m llava_sft.eval.score vizwiz --answers "$RESULTS_DIR/answers/vizwiz.jsonl" --questions "$D/llava_test.jsonl" \
  ${VIZWIZ_ANNOTATIONS:+--annotations "$VIZWIZ_ANNOTATIONS"} \
  --submission "$RESULTS_DIR/upload/vizwiz.json" --out "$(out_json vizwiz "${VIZWIZ_ANNOTATIONS:-}")"
