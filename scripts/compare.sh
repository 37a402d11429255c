#!/usr/bin/env bash
# Trains colm and the three baselines (random, full, accumulate) on the same data
# order (same seed), then compares them: runs/compare/report/report.md + plots.
# Extra arguments are config overrides applied to every run, e.g. train.steps=40
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
for method in colm random full accumulate; do
  .venv/bin/colm train configs/default.yaml name=$method train.method=$method \
    output_dir=runs/compare/$method "$@"
done
.venv/bin/colm report runs/compare/colm runs/compare/random runs/compare/full \
  runs/compare/accumulate --out runs/compare/report
