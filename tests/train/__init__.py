"""Tests of fragment_llm.train."""
