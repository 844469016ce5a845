"""Tests of fragment_llm.checkpoint."""
