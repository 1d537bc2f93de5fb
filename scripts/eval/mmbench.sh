#!/bin/bash
# MMBench dev (LLaVA scripts/v1_5/eval/mmbench.sh): all circular rounds; local circular accuracy + upload file.
#   bash scripts/eval/mmbench.sh MODEL_DIR [RESULTS_DIR]   (environment: see scripts/eval/_common.sh)
source "$(dirname "$0")/_common.sh"

SPLIT=mmbench_dev_20230712
D="$EVAL/mmbench"
need "$D/$SPLIT.tsv"
run_answers mmbench --mode mmbench --questions "$D/$SPLIT.tsv"
python -m llava_sft.eval.score mmbench --answers "$RESULTS_DIR/answers/mmbench.jsonl" --annotations "$D/$SPLIT.tsv" \
  --submission "$RESULTS_DIR/upload/$SPLIT.tsv" --out "$RESULTS_DIR/mmbench.json"
