#!/usr/bin/env bash
# Create .venv (once) and install Fragment LLM with its dev and bench extras.
# torch is installed first at the pinned CPU build: an unpinned torch would pull a
# multi-GB CUDA wheel onto a laptop that cannot use it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev,bench]"
