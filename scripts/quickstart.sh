#!/usr/bin/env bash
# Set up, then run the whole pipeline on the bundled sample corpus in data/raw/:
# clean it, train a tokenizer, train the `tiny` GPT and generate text from it, then
# fine-tune it on the bundled conversations so it answers, and ask it a question.
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
echo
echo "Now teaching it to answer: fine-tuning on data/conversations/fragment.jsonl"
rm -rf checkpoints-chat   # a fresh fine-tuning run, not a resume
# The tiny model is small enough to tune every weight (--method full); LoRA, the
# default, pays off on larger models (docs/finetune.md).
fragment finetune --base checkpoints --data data/conversations/fragment.jsonl \
    --method full --lr 1e-3 --max-steps 200 --out checkpoints-chat
fragment eval --checkpoint checkpoints-chat --baseline checkpoints   # tuned vs base
question="Who are you?"
echo
echo "you> $question"
printf '%s\n' "$question" | fragment chat --checkpoint checkpoints-chat -q --seed 1 \
    --temperature 0.5 --max-new-tokens 60
echo
echo "Next, talk to it: .venv/bin/fragment chat --checkpoint checkpoints-chat"
echo "(or: source .venv/bin/activate; fragment chat --checkpoint checkpoints-chat)"
