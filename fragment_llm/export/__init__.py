"""Artifacts for other tools, written from ours (today the HF `tokenizers` JSON)."""
