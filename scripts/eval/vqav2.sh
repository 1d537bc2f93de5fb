#!/bin/bash
# VQAv2 test-dev (LLaVA scripts/v1_5/eval/vqav2.sh): upload file; local accuracy only with VQAV2_ANNOTATIONS (val).
#   bash scripts/eval/vqav2.sh MODEL_DIR [RESULTS_DIR]   (environment: see scripts/eval/_common.sh)
source "$(dirname "$0")/_common.sh"

SPLIT=llava_vqav2_mscoco_test-dev2015
D="$EVAL/vqav2"
need "$D/$SPLIT.jsonl" "$D/test2015"
run_answers vqav2 --questions "$D/$SPLIT.jsonl" --image-folder "$D/test2015"
ALL_TEST="$D/llava_vqav2_mscoco_test2015.jsonl"
[[ -f "$ALL_TEST" ]] || ALL_TEST=""
python -m llava_sft.eval.score vqav2 --answers "$RESULTS_DIR/answers/vqav2.jsonl" \
  ${ALL_TEST:+--questions "$ALL_TEST"} ${VQAV2_ANNOTATIONS:+--annotations "$VQAV2_ANNOTATIONS"} \
  --submission "$RESULTS_DIR/upload/vqav2_test-dev2015.json" --out "$(out_json vqav2 "${VQAV2_ANNOTATIONS:-}")"
