#!/usr/bin/env bash
# Embedded CPU demo: data generation -> Stage 1 -> Stage 2 -> evaluation (under 10 minutes on 2 cores).
#   bash scripts/demo.sh [key=value ...]     (config overrides, given to both training stages)
# Writes data to $DEMO_DATA (data/demo) and runs to $DEMO_OUT (checkpoints/demo): stage1/, stage2/, eval/.
set -euo pipefail
cd "$(dirname "$0")/.."
export TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore
DATA=${DEMO_DATA:-data/demo}
OUT=${DEMO_OUT:-checkpoints/demo}
SIZES=${DEMO_SIZES:---n-stage1 3000 --n-stage2 6000 --n-eval 300}
# Stage-2 samples: 2-5 rounds, image always before the first question (as at evaluation), fewer
# long descriptions (they would dominate the token-averaged loss), more yes/no existence questions.
SHAPES_ARGS="--min-rounds 2 --max-rounds 5 --image-first 1 --type-weights color=1,shape=1,count=1,position=1,exists=1.5,describe=0.5"
start=$(date +%s)

echo "== 1/4 data: synthetic shapes images, captions, instructions, eval questions =="
python -m data_prep.make_shapes --out "$DATA" --seed 0 --image-size 48 $SHAPES_ARGS $SIZES
python -m data_prep.make_tokenizer --corpus "$DATA/corpus.txt" --out "$DATA/tokenizer" --vocab-size 600
rm -rf "$OUT/stage1" "$OUT/stage2" "$OUT/eval"
common=(model.tokenizer="$DATA/tokenizer" data.image_folder="$DATA/images")

echo "== 2/4 Stage 1: feature alignment (projector only, frozen LLM, plain captions) =="
python -m llava_sft.train configs/demo/stage1.yaml "${common[@]}" data.path="$DATA/stage1.json" \
  train.output_dir="$OUT/stage1" "$@"

echo "== 3/4 Stage 2: visual instruction tuning (projector + LLM, vicuna_v1) =="
python -m llava_sft.train configs/demo/stage2.yaml "${common[@]}" data.path="$DATA/stage2.json" \
  train.pretrained_projector="$OUT/stage1" train.output_dir="$OUT/stage2" "$@"

echo "== 4/4 evaluation: held-out questions, with the image and blind =="
python -m llava_sft.eval.run_shapes --model "$OUT/stage2" --data "$DATA" --out "$OUT/eval"
echo "demo finished in $(( $(date +%s) - start )) s"
