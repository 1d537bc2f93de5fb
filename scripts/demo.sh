#!/usr/bin/env bash
# Embedded CPU demo: data generation -> Stage 1 -> Stage 2 -> evaluation (about 10 minutes on 2 cores).
#   bash scripts/demo.sh            # writes checkpoints/demo/{stage1,stage2,eval}
set -euo pipefail
cd "$(dirname "$0")/.."
export TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore
DATA=data/demo
OUT=checkpoints/demo
start=$(date +%s)

echo "== 1/4 data: synthetic shapes images, captions, instructions, eval questions =="
python -m data_prep.make_shapes --out "$DATA" --seed 0 --image-size 48 --n-stage2 6000 --max-rounds 5
python -m data_prep.make_tokenizer --corpus "$DATA/corpus.txt" --out "$DATA/tokenizer" --vocab-size 600

echo "== 2/4 Stage 1: feature alignment (projector only, plain captions) =="
rm -rf "$OUT/stage1" "$OUT/stage2" "$OUT/eval"
python -m llava_sft.train configs/demo/stage1.yaml "$@"

echo "== 3/4 Stage 2: visual instruction tuning (projector + LLM, vicuna_v1) =="
python -m llava_sft.train configs/demo/stage2.yaml "$@"

echo "== 4/4 evaluation: held-out questions, with the image and blind =="
python -m llava_sft.eval.run_shapes --model "$OUT/stage2" --data "$DATA" --out "$OUT/eval"
echo "demo finished in $(( $(date +%s) - start )) s"
