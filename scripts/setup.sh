#!/usr/bin/env bash
# Create .venv (once) and install Fragment LLM with its dev, bench, serve and plot extras.
# torch is installed first at the pinned CPU build: an unpinned torch would pull a
# multi-GB CUDA wheel onto a laptop that cannot use it.
# One line per step says what is being installed; pip itself stays quiet (-q).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $PYTHON"
    "$PYTHON" -m venv .venv
fi
echo "setup: upgrading pip in .venv"
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
echo "setup: installing torch 2.13.0 (the largest download; the longest step)"
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
echo "setup: installing fragment-llm with its dev, bench, serve and plot extras (pytest, ruff, tokenizers, fastapi, matplotlib, ...)"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev,bench,serve,plot]"
echo "setup: done; the \`fragment\` command is .venv/bin/fragment"
