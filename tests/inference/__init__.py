"""Tests of fragment_llm.inference."""
