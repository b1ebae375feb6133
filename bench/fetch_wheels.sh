#!/usr/bin/env bash
# Pure-Python wheels the lent GPU's image lacks (ml_collections) or may have older than requirements.txt pins (flax,
# optax), into .whl/ (git-ignored) for the device call to carry; bench/gpu_check.py installs the ones it needs with
# pip --no-index --no-deps --target. Run here, where PyPI is reachable.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${JAXCHAT_PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3.12 )}
pin() { grep -i "^$1==" requirements.txt | head -n1; }
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 -d .whl "$(pin ml_collections)" "$(pin flax)" "$(pin optax)"
ls -la .whl
