"""Evaluation: the demo shapes benchmark (runner and scorer)."""
