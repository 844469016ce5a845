#!/usr/bin/env bash
# Set up, then run the whole pipeline on the bundled sample corpus in data/raw/.
# Safe to run again: each stage replaces its previous output (--overwrite).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
fragment preprocess data/raw --out data/processed --overwrite
fragment train-tokenizer --data data/processed --out data/tokenizer.json --overwrite
