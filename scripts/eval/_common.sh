# Shared by scripts/eval/*.sh (sourced, not run): arguments, paths, GPU sharding of the answer runs.
#   bash scripts/eval/NAME.sh MODEL_DIR [RESULTS_DIR]
# Environment:
#   LLAVA_EVAL_ROOT  LLaVA eval.zip tree (default ./playground/data/eval), same relative paths as LLaVA's
#                    scripts/v1_5/eval/*.sh
#   CUDA_VISIBLE_DEVICES  GPUs to shard over (default: all GPUs nvidia-smi lists; none: one CPU process)
#   EVAL_CHUNKS      number of shards to run without GPU pinning (overrides the GPU list)
#   RUN_VQA_ARGS     extra flags for python -m llava_sft.eval.run_vqa (e.g. "--batch-size 8")
#   JUDGE_ARGS       extra flags for python -m llava_sft.eval.judge (e.g. "--base-url http://host:8000/v1")
set -euo pipefail

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
  echo "usage: bash $0 MODEL_DIR [RESULTS_DIR]   (RESULTS_DIR default: checkpoints/eval/NAME-HASH, unique per model path)" >&2
  exit 2
fi
MODEL_DIR=${1%/}
# default results directory: the model folder's name + a hash of its resolved path (two models whose folders are both
# called stage2 no longer share answers; run_vqa also refuses to resume answers another model wrote)
MODEL_KEY=$(python -c 'import hashlib, os, sys; print(hashlib.sha256(os.path.realpath(sys.argv[1]).encode()).hexdigest()[:8])' "$MODEL_DIR")
RESULTS_DIR=${2:-checkpoints/eval/$(basename "$MODEL_DIR")-$MODEL_KEY}
EVAL=${LLAVA_EVAL_ROOT:-./playground/data/eval}
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
mkdir -p "$RESULTS_DIR/answers" "$RESULTS_DIR/upload"
read -ra RUN_VQA_EXTRA <<< "${RUN_VQA_ARGS:-}"
read -ra JUDGE_EXTRA <<< "${JUDGE_ARGS:-}"

# need FILE...: stop with a clear message when an input of the eval tree is missing
need() {
  local f
  for f in "$@"; do
    if [[ ! -e "$f" ]]; then
      echo "missing $f (expected in the LLaVA eval.zip layout under LLAVA_EVAL_ROOT=$EVAL)" >&2
      exit 1
    fi
  done
}

# out_json NAME [GROUND_TRUTH]: where the score JSON goes. Without local ground truth the scorer has no
# headline (upload file only): it is written as NAME_submission.json so that report.py shows "—".
out_json() {
  if [[ -n "${2:-}" ]]; then echo "$RESULTS_DIR/$1.json"; else echo "$RESULTS_DIR/$1_submission.json"; fi
}

# run_answers NAME RUN_VQA_FLAGS...: answers -> $RESULTS_DIR/answers/NAME.jsonl, one shard per GPU
# (--num-chunks/--chunk-idx, resumable chunk files), then --merge in chunk order, as LLaVA's scripts do.
run_answers() {
  local name=$1; shift
  local gpus=() chunks idx pids=() failed=0
  if [[ -n "${EVAL_CHUNKS:-}" ]]; then
    chunks=$EVAL_CHUNKS
  else
    if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
      IFS=',' read -ra gpus <<< "$CUDA_VISIBLE_DEVICES"
    elif command -v nvidia-smi >/dev/null 2>&1; then
      read -ra gpus <<< "$(nvidia-smi -L 2>/dev/null | awk '/^GPU /{printf "%d ", NR-1}')"
    fi
    chunks=$(( ${#gpus[@]} > 0 ? ${#gpus[@]} : 1 ))
  fi
  local dir="$RESULTS_DIR/answers/${name}_chunks" chunk_files=()
  mkdir -p "$dir"
  echo "[$name] answering with $MODEL_DIR in $chunks shard(s)"
  for idx in $(seq 0 $((chunks - 1))); do
    chunk_files+=("$dir/${chunks}_${idx}.jsonl")
    if [[ ${#gpus[@]} -gt 0 ]]; then
      CUDA_VISIBLE_DEVICES=${gpus[$idx]} python -m llava_sft.eval.run_vqa --model "$MODEL_DIR" "$@" \
        --answers "$dir/${chunks}_${idx}.jsonl" --num-chunks "$chunks" --chunk-idx "$idx" \
        --temperature 0 "${RUN_VQA_EXTRA[@]}" &
    else
      python -m llava_sft.eval.run_vqa --model "$MODEL_DIR" "$@" \
        --answers "$dir/${chunks}_${idx}.jsonl" --num-chunks "$chunks" --chunk-idx "$idx" \
        --temperature 0 "${RUN_VQA_EXTRA[@]}" &
    fi
    pids+=($!)
  done
  for idx in "${!pids[@]}"; do
    wait "${pids[$idx]}" || { echo "[$name] shard $idx failed" >&2; failed=1; }
  done
  [[ $failed -eq 0 ]] || exit 1
  python -m llava_sft.eval.run_vqa --answers "$RESULTS_DIR/answers/$name.jsonl" --merge "${chunk_files[@]}"
}
