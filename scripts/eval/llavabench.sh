#!/bin/bash
# LLaVA-Bench (In-the-Wild) (LLaVA scripts/v1_5/eval/llavabench.sh): LLM-judge reviews, LLAVA_BENCH_RUNS (default 3) runs, mean relative score.
#   bash scripts/eval/llavabench.sh MODEL_DIR [RESULTS_DIR]   (environment: see scripts/eval/_common.sh)
source "$(dirname "$0")/_common.sh"

D="$EVAL/llava-bench-in-the-wild"
need "$D/questions.jsonl" "$D/images" "$D/context.jsonl" "$D/answers_gpt4.jsonl"
run_answers llava_bench --mode longform --questions "$D/questions.jsonl" --image-folder "$D/images"
mkdir -p "$RESULTS_DIR/reviews"
REVIEWS=()
for RUN in $(seq 1 "${LLAVA_BENCH_RUNS:-3}"); do
  python -m llava_sft.eval.judge llava_bench --questions "$D/questions.jsonl" --context "$D/context.jsonl" \
    --reference "$D/answers_gpt4.jsonl" --answers "$RESULTS_DIR/answers/llava_bench.jsonl" \
    --out "$RESULTS_DIR/reviews/llava_bench-eval$RUN.jsonl" "${JUDGE_EXTRA[@]}"
  REVIEWS+=("$RESULTS_DIR/reviews/llava_bench-eval$RUN.jsonl")
done
python -m llava_sft.eval.score llava_bench --answers "${REVIEWS[@]}" --out "$RESULTS_DIR/llava_bench.json"
