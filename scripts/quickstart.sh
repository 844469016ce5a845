#!/usr/bin/env bash
# Set up, then run the whole pipeline on the bundled sample corpus in data/raw/:
# clean it, train a tokenizer, train the `tiny` GPT, and generate text from it.
# Safe to run again: each stage replaces its previous output.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
fragment preprocess data/raw --out data/processed --overwrite
fragment train-tokenizer --data data/processed --out data/tokenizer.json --overwrite --vocab-size 8192
rm -rf checkpoints/step-* checkpoints/metrics.jsonl   # a fresh run, not a resume
fragment train --preset tiny --data data/processed --tokenizer data/tokenizer.json --out checkpoints
prompt="ROMEO."
echo
echo "The model you just trained, continuing \"$prompt\":"
echo
printf '%s' "$prompt"   # generate prints only the continuation, which goes on from here
fragment generate --checkpoint checkpoints --prompt "$prompt" --max-new-tokens 80 --seed 1
echo
echo "Next, talk to it: .venv/bin/fragment chat   (or: source .venv/bin/activate; fragment chat)"
