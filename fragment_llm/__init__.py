"""Fragment LLM: raw text -> clean shards -> BPE tokenizer -> GPT -> chat, on one small machine.

Importing the package does no work: stages import their heavy dependencies
(torch, pyarrow) only when a command needs them, so `fragment --help` stays instant.
"""

__version__ = "0.1.0"
