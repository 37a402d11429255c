#!/usr/bin/env bash
# Compares colm with what a user would pick instead (the full batch, gradient
# accumulation, a random subset with and without Adam's beta2 scaled, random_big) on the
# same data order, seed by seed: the quality protocol of benchmarks/bench_quality.py
# (configs/bench_quality.yaml: 32 steps, held-out loss on 50 examples of every source
# every 8 steps). Writes $OUT/quality.md with paired differences, and plots of held-out
# loss against step and against wall time. One seed of the protocol's six methods takes
# about 1.5 hours on a 2-core CPU; finished runs are kept, so a stopped comparison
# continues where it stopped.
#
#   bash scripts/compare.sh                    # seed 0, into runs/compare
#   SEEDS=0,1,2,3,4 OUT=benchmarks/results/quality bash scripts/compare.sh
#                                              # the committed comparison (RESULTS.md)
#   bash scripts/compare.sh --quick            # a tiny model, 4 steps: checks the mechanics
#
# VARIANTS picks the methods (default: protocol); extra arguments go to bench_quality.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/python benchmarks/bench_quality.py --variants "${VARIANTS:-protocol}" \
  --seeds "${SEEDS:-0}" --out "${OUT:-runs/compare}" "$@"
echo
echo "Open ${OUT:-runs/compare}/quality.md and the plots beside it."
