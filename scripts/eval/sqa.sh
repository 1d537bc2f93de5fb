#!/bin/bash
# ScienceQA-IMG test (LLaVA scripts/v1_5/eval/sqa.sh).
#   bash scripts/eval/sqa.sh MODEL_DIR [RESULTS_DIR]   (environment: see scripts/eval/_common.sh)
source "$(dirname "$0")/_common.sh"

D="$EVAL/scienceqa"
need "$D/llava_test_CQM-A.json" "$D/images/test" "$D/problems.json" "$D/pid_splits.json"
run_answers scienceqa --mode scienceqa --questions "$D/llava_test_CQM-A.json" --image-folder "$D/images/test"
python -m llava_sft.eval.score scienceqa --answers "$RESULTS_DIR/answers/scienceqa.jsonl" --annotations "$D" \
  --split test --out "$RESULTS_DIR/scienceqa.json"
