"""Tests of fragment_llm.data."""
