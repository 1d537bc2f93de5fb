"""llava_sft: LLaVA-style visual instruction tuning (Stage 1 alignment, Stage 2 instruction tuning)."""

__version__ = "0.1.0"
