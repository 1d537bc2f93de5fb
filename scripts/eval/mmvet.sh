#!/bin/bash
# MM-Vet (LLaVA scripts/v1_5/eval/mmvet.sh + MM-Vet's evaluator): LLM-judge grades, MMVET_RUNS (default 1) runs.
#   bash scripts/eval/mmvet.sh MODEL_DIR [RESULTS_DIR]   (environment: see scripts/eval/_common.sh)
source "$(dirname "$0")/_common.sh"

D="$EVAL/mm-vet"
MMVET_JSON=${MMVET_JSON:-$D/mm-vet.json}
RUNS=${MMVET_RUNS:-1}
need "$D/llava-mm-vet.jsonl" "$D/images" "$MMVET_JSON"
run_answers mm_vet --mode longform --questions "$D/llava-mm-vet.jsonl" --image-folder "$D/images"
python -m llava_sft.eval.score mm_vet --model-answers "$RESULTS_DIR/answers/mm_vet.jsonl" \
  --submission "$RESULTS_DIR/upload/mm_vet_results.json"
python -m llava_sft.eval.judge mm_vet --mmvet "$MMVET_JSON" --answers "$RESULTS_DIR/upload/mm_vet_results.json" \
  --num-run "$RUNS" --out "$RESULTS_DIR/reviews/mm_vet_grade-${RUNS}runs.json" "${JUDGE_EXTRA[@]}"
python -m llava_sft.eval.score mm_vet --answers "$RESULTS_DIR/reviews/mm_vet_grade-${RUNS}runs.json" \
  --annotations "$MMVET_JSON" --num-run "$RUNS" --out "$RESULTS_DIR/mm_vet.json"
