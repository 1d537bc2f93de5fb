"""The training core (`python -m llava_sft.train CONFIG.yaml`)."""
