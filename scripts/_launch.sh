# Shared launcher for stage1.sh / stage2.sh (sourced, not run).
# Single node: all local GPUs. Multi-node: set NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT on every node.
# The global batch size in the config is kept constant: the trainer derives the gradient-accumulation
# steps as global_batch_size / (world_size x micro_batch_size).
# DeepSpeed (train.deepspeed in the config) is launched the same way: the trainer calls
# deepspeed.init_distributed, which reads RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set by
# torchrun (a lone process without torchrun gets a one-rank group). No `deepspeed` launcher needed.
# Before launching, `python -m llava_sft.envcheck` reports environment traps (CLIP weights not on disk offline,
# flash_attention_2 without flash-attn/CUDA, a GPU recipe without a GPU) as one line each, naming the fix, and an
# error stops here rather than minutes into the job. LLAVA_SKIP_ENVCHECK=1 launches anyway.
# Exit status: the trainer's (0 done, 2 config, 3 non-finite, 4 bad sample, 75 pre-empted: run the same command
# again to continue). Several processes go through llava_sft/launch.py (torchrun with pre-emption handled).
launch() {
  local config=$1; shift
  if [[ "${LLAVA_SKIP_ENVCHECK:-0}" != 1 ]]; then
    python -m llava_sft.envcheck "$config" "$@" || {
      echo "[launch] stopped by the environment check above (LLAVA_SKIP_ENVCHECK=1 to launch anyway)" >&2; exit 1; }
  fi
  if [[ -z "${GPUS_PER_NODE:-}" ]]; then
    GPUS_PER_NODE=$(command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -c GPU || echo 0)
  fi
  NNODES=${NNODES:-1}; NODE_RANK=${NODE_RANK:-0}
  MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}; MASTER_PORT=${MASTER_PORT:-29500}
  export TOKENIZERS_PARALLELISM=false
  if [[ "$GPUS_PER_NODE" -le 1 && "$NNODES" -eq 1 ]]; then
    echo "[launch] single process: python -m llava_sft.train $config $*"
    exec python -m llava_sft.train "$config" "$@"
  fi
  echo "[launch] torchrun: $NNODES node(s) x $GPUS_PER_NODE GPU(s), node rank $NODE_RANK, master $MASTER_ADDR:$MASTER_PORT"
  # torchrun inside llava_sft.launch: SIGUSR1 and the first SIGTERM reach the ranks (checkpoint, exit 75) instead of
  # killing torchrun or leaving the ranks 30 s; the exit status is 75 when the job was pre-empted (scripts/slurm/)
  exec python -m llava_sft.launch --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS_PER_NODE" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" -m llava_sft.train "$config" "$@"
}
