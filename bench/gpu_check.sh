#!/usr/bin/env bash
# The prepared GPU check (bench/gpu_check.py says what it measures). On a lent card, from the repo root:
#   bash bench/gpu_check.sh                 # <= 6 minutes on one H100/H200; figures in $OUT/results.jsonl
#   bash bench/gpu_check.sh --dry-run       # the same stages at toy sizes, on any machine (~2 minutes on a CPU)
# Carry .whl/ (bench/fetch_wheels.sh fills it) so ml_collections, and flax/optax when the image's are older, install.
# A rerun on the same machine reuses the persistent compilation cache in $JAX_COMPILATION_CACHE_DIR.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -n "${JAXCHAT_PYTHON:-}" ]; then PY=$JAXCHAT_PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3
fi
export OUT="${OUT:-$PWD/out/gpu_check}"
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/jaxchat-jax-cache}"
mkdir -p "$OUT" "$JAX_COMPILATION_CACHE_DIR"
exec "$PY" bench/gpu_check.py --out="$OUT" "$@"
