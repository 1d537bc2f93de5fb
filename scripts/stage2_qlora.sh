#!/usr/bin/env bash
# Stage 2 with QLORA (LLaVA-1.5 LoRA recipe): bash scripts/stage2_qlora.sh [key=value ...]
# Then: python -m llava_sft.merge_lora --model checkpoints/llava-v1.5-7b-qlora --out checkpoints/llava-v1.5-7b-qlora-merged
exec bash "$(dirname "$0")/stage2.sh" configs/llava_v1_5/stage2_finetune_7b_qlora.yaml "$@"
