"""The byte-level BPE tokenizer: pre-splitting, chunk counting, merge learning, the
tokenizer file, training it on a processed folder, and chat templates."""
