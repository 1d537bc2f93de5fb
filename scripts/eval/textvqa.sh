#!/bin/bash
# TextVQA val (LLaVA scripts/v1_5/eval/textvqa.sh).
#   bash scripts/eval/textvqa.sh MODEL_DIR [RESULTS_DIR]   (environment: see scripts/eval/_common.sh)
source "$(dirname "$0")/_common.sh"

D="$EVAL/textvqa"
need "$D/llava_textvqa_val_v051_ocr.jsonl" "$D/train_images" "$D/TextVQA_0.5.1_val.json"
run_answers textvqa --questions "$D/llava_textvqa_val_v051_ocr.jsonl" --image-folder "$D/train_images"
python -m llava_sft.eval.score textvqa --answers "$RESULTS_DIR/answers/textvqa.jsonl" \
  --annotations "$D/TextVQA_0.5.1_val.json" --out "$RESULTS_DIR/textvqa.json"
