"""Tests of fragment_llm.cli."""
