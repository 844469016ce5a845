"""Tests of fragment_llm.tokenizer."""
