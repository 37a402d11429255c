#!/usr/bin/env bash
# Sets up from nothing and runs the test suite (slow tests too with: scripts/test.sh -m "")
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check src tests benchmarks examples
.venv/bin/python -m pytest -q -m "not slow" "$@"
