"""The `fragment` command line: one module per verb, the exit-code map, rendering."""

from fragment_llm.cli.app import main

__all__ = ["main"]
