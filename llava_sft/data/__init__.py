"""Data: chat templates, tokenization and masking, image preprocessing, datasets and batching."""
