#!/usr/bin/env bash
# Sets up from nothing and runs the main job on the built-in default (offline):
# train SmolLM2-135M-Instruct + LoRA with CoLM coresets on the reasoning-gym mixture,
# evaluate it, and write a report with plots. Extra arguments are config overrides,
# e.g. bash scripts/demo.sh train.steps=5
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/colm train configs/default.yaml "$@"
.venv/bin/colm report runs/default --out runs/default/report
echo
echo "Open runs/default/report/report.md and the plots beside it (runs/default/report/*.png)."
