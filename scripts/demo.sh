#!/usr/bin/env bash
# Embedded CPU demo: data generation -> Stage 1 -> Stage 2 -> evaluation (under 10 minutes on 2 cores).
#   bash scripts/demo.sh [key=value ...]     (config overrides, given to both training stages)
# Writes data to $DEMO_DATA (data/demo) and runs to $DEMO_OUT (checkpoints/demo): stage1/, stage2/, eval/.
# DEMO_BASE=pretrained: first pretrain the base models from the generated data (data_prep/pretrain_base.py, cached
# in $DEMO_OUT/base/: an LLM on prose, a CLIP-style tower on image-caption pairs) and align to those
# (configs/demo/base_stage*.yaml); the default (random) uses random-init ones (configs/demo/stage*.yaml).
set -euo pipefail
cd "$(dirname "$0")/.."
export TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore
DATA=${DEMO_DATA:-data/demo}
OUT=${DEMO_OUT:-checkpoints/demo}
SIZES=${DEMO_SIZES:---n-stage1 3000 --n-stage2 6000 --n-eval 300}
BASE=${DEMO_BASE:-random}
case "$BASE" in
  random) PROSE=(); CONFIGS=configs/demo/stage ;;
  pretrained) PROSE=(--n-prose "${DEMO_PROSE:-20000}"); CONFIGS=configs/demo/base_stage ;;
  *) echo "DEMO_BASE must be random or pretrained, got '$BASE'" >&2; exit 2 ;;
esac
# Stage-2 samples: 2-5 rounds, image always before the first question (as at evaluation), fewer
# long descriptions (they would dominate the token-averaged loss), more yes/no existence questions.
SHAPES_ARGS="--min-rounds 2 --max-rounds 5 --image-first 1 --type-weights color=1,shape=1,count=1,position=1,exists=1.5,describe=0.5"
start=$(date +%s)

echo "== 1/4 data: synthetic shapes images, captions, instructions, eval questions =="
python -m data_prep.make_shapes --out "$DATA" --seed 0 --image-size 48 $SHAPES_ARGS $SIZES "${PROSE[@]}"
python -m data_prep.make_tokenizer --corpus "$DATA/corpus.txt" --out "$DATA/tokenizer" --vocab-size 600
rm -rf "$OUT/stage1" "$OUT/stage2" "$OUT/eval"
common=(model.tokenizer="$DATA/tokenizer" data.image_folder="$DATA/images")
if [ "$BASE" = pretrained ]; then
  echo "== base models: an LLM pretrained on prose, a CLIP-style tower on image-caption pairs (cached) =="
  python -m data_prep.pretrain_base --data "$DATA" --tokenizer "$DATA/tokenizer" --out "$OUT/base" ${DEMO_BASE_ARGS:-}
  common+=(model.llm.path="$OUT/base/llm" model.vision.pretrained="$OUT/base/clip.pt")
fi

echo "== 2/4 Stage 1: feature alignment (projector only, frozen LLM, plain captions) =="
python -m llava_sft.train "${CONFIGS}1.yaml" "${common[@]}" data.path="$DATA/stage1.json" \
  train.output_dir="$OUT/stage1" "$@"

echo "== 3/4 Stage 2: visual instruction tuning (projector + LLM, vicuna_v1) =="
python -m llava_sft.train "${CONFIGS}2.yaml" "${common[@]}" data.path="$DATA/stage2.json" \
  train.pretrained_projector="$OUT/stage1" train.output_dir="$OUT/stage2" "$@"

echo "== 4/4 evaluation: held-out questions, with the image and blind =="
python -m llava_sft.eval.run_shapes --model "$OUT/stage2" --data "$DATA" --out "$OUT/eval"
echo "demo finished in $(( $(date +%s) - start )) s"
