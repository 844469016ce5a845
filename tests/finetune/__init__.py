"""Tests of fragment_llm.finetune."""
