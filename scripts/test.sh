#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run the checks CI runs: lint, security lint, tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh && bash scripts/install_browser.sh
.venv/bin/ruff check fragment_llm tests scripts
.venv/bin/bandit -q -r fragment_llm --severity-level medium
.venv/bin/python -m pytest -q "$@"
