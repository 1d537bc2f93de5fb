#!/usr/bin/env bash
# The SFT lessons, measured on the demo: 10 claims from the papers and the SFT notes, each rerun on the demo with
# one thing changed, at 2 training seeds, with a verdict computed from the numbers (llava_sft/eval/ablations.py
# says how). Every run is the demo's own recipe (configs/demo/base_stage*.yaml) through python -m llava_sft.train.
#   bash scripts/demo_ablations.sh [--seeds 0 1] [--jobs 2] [--stage2 KEY=VALUE ...]
# Every Stage-2 run takes a shorter budget than the demo's own (10 epochs at batch 16): 3 epochs at batch 16, the
# setting the measured table in benchmarks/RESULTS.md was made with; 10 rows x 2 seeds then fit in 45 minutes on
# 2 cores (21.5 minutes measured, 2026-12-02). `--stage2 train.epochs=10` gives the demo's pass-2 budget (about 3x the
# Stage-2 time, not measured). Stage 2 here is one pass on the full set: demo.sh's one-shape first
# pass (a curriculum the papers do not have) is left out, so each row changes one thing of the paper recipe. Writes $DEMO_OUT/ablations/results.json,
# results.md and results.png; finished runs are reused on a rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_demo_common.sh
start=$(date +%s)
echo "== data (with the ablation sets: stage2_1k.json, stage2_two_types.json) and base models (cached) =="
demo_data --ablation-sets
# the AnyRes row's set: the same layouts and questions on 96-px canvases with half-size shapes (its tokenizer: the main one)
python -m data_prep.make_shapes --out "$DATA/detail" --seed 0 --image-size 96 --shape-scale 0.5 $SHAPES_ARGS $SIZES \
  --n-stage1 1 --n-stage2-warmup 0 > /dev/null
# the DPO row's preference pairs: the truth against a hallucination, on the Stage-2 images (+ held-out ones)
python -m data_prep.make_preferences --data "$DATA" ${DEMO_PREFS:-} > /dev/null
demo_base
echo "== ablation runs =="
python -m llava_sft.eval.ablations --data "$DATA" --base "$OUT/base" --out "$OUT/ablations" \
  --stage2 train.epochs=3 train.global_batch_size=16 train.micro_batch_size=16 "$@"
echo "ablations finished in $(( $(date +%s) - start )) s"
