"""Text data: raw files -> a processed folder (preprocess) -> token shards, and the
blocks and batches training and evaluation read from them."""
