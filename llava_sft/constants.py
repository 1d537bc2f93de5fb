"""Constants shared by data, model and evaluation code."""

IGNORE_INDEX = -100
"""Label value for positions that carry no loss (system, user, image, padding)."""

IMAGE_TOKEN_INDEX = -200
"""Placeholder id for one image in `input_ids` before it is expanded into feature tokens."""

IMAGE_PLACEHOLDER = "<image>"
"""The text marker of an image in LLaVA-format conversations."""
