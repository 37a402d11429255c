#!/usr/bin/env bash
# Sets up from nothing and runs the main job on the built-in default (offline).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/colm demo "$@"
