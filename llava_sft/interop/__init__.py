"""Interoperability: convert to and from the Hugging Face / official LLaVA formats.

clip_convert.py    open_clip CLIP ViT  -> HF `CLIPVisionModel` (config + weights), refusing what HF cannot express
chat_template.py   our chat templates (templates.yaml) -> the Jinja `chat_template` of HF tokenizers/processors
hf_llava.py        our model directory -> HF `LlavaForConditionalGeneration` directory (`python -m llava_sft.export hf`)
official.py        official LLaVA-1.5 checkpoints / LLaVA-Pretrain `mm_projector.bin` -> our model directory
"""
