#!/usr/bin/env bash
# Stage 2 with LORA (LLaVA-1.5 LoRA recipe): bash scripts/stage2_lora.sh [key=value ...]
# Then: python -m llava_sft.merge_lora --model checkpoints/llava-v1.5-7b-lora --out checkpoints/llava-v1.5-7b-lora-merged
exec bash "$(dirname "$0")/stage2.sh" configs/llava_v1_5/stage2_finetune_7b_lora.yaml "$@"
