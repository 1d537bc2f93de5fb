#!/bin/bash
# MMBench-CN dev (LLaVA scripts/v1_5/eval/mmbench_cn.sh): Chinese instruction, all circular rounds.
#   bash scripts/eval/mmbench_cn.sh MODEL_DIR [RESULTS_DIR]   (environment: see scripts/eval/_common.sh)
source "$(dirname "$0")/_common.sh"

SPLIT=mmbench_dev_cn_20231003
D="$EVAL/mmbench_cn"
need "$D/$SPLIT.tsv"
run_answers mmbench_cn --mode mmbench --lang cn --questions "$D/$SPLIT.tsv"
python -m llava_sft.eval.score mmbench --answers "$RESULTS_DIR/answers/mmbench_cn.jsonl" --annotations "$D/$SPLIT.tsv" \
  --submission "$RESULTS_DIR/upload/$SPLIT.tsv" --out "$RESULTS_DIR/mmbench_cn.json"
