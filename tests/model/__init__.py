"""Tests of fragment_llm.model."""
