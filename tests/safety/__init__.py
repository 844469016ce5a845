"""Tests of fragment_llm.safety."""
