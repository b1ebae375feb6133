#!/usr/bin/env bash
# The d20 speedrun: nanochat's October 2025 "$100" pipeline on one 8-GPU node (about 4 hours on 8xH100).
#
#   bash runs/speedrun.sh                      # d20: download, tokenizer, base, CORE, mid, SFT, chat evals, report
#   bash runs/speedrun.sh --depth 26           # another tier of the depth dial (run name d26)
#   bash runs/speedrun.sh --rl                 # also the optional RL stage on GSM8K
#   bash runs/speedrun.sh --config.device_batch_size=16   # any config field, passed to every step
#   bash runs/speedrun.sh --config configs/d24.py --base-only --shards 170   # runs/speedrun_gpt2.sh: tokenizer, base, CORE
#
# Options: --depth N, --config FILE (default configs/d20.py), --run NAME, --shards N (default: enough for the
# horizon with the config's packing, what `python -m jaxchat.config ... --shards-needed` prints), --rl, --cpu (CPU
# jax, no CUDA wheels), --offline (no downloads: for the embedded tiny corpus), --no-venv (use $PYTHON or python3.12
# as it is), --base-only (stop after base training and its CORE evaluation). runs/tiny.sh is this script on
# configs/tiny.py, CPU, offline.
#
# Resumable: re-run the same command after an interruption. Finished steps are skipped (their markers are in
# $JAXCHAT_HOME/runs/<run>/speedrun/), downloads skip valid files, and training resumes from its checkpoint.
# Delete a marker to redo that step. Logs: $JAXCHAT_HOME/runs/<run>/speedrun/logs/<step>.log.
# One JAX process drives all 8 GPUs of the node; for several nodes see docs/multihost.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; }

CONFIG=configs/d20.py DEPTH="" RUN="" SHARDS="" WITH_RL=0 CPU=0 OFFLINE=0 VENV=1 BASE_ONLY=0
OVERRIDES=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --depth) DEPTH=$2; shift 2 ;;
    --depth=*) DEPTH=${1#*=}; shift ;;
    --config) CONFIG=$2; shift 2 ;;
    --config=*) CONFIG=${1#*=}; shift ;;
    --run) RUN=$2; shift 2 ;;
    --run=*) RUN=${1#*=}; shift ;;
    --shards) SHARDS=$2; shift 2 ;;
    --shards=*) SHARDS=${1#*=}; shift ;;
    --rl) WITH_RL=1; shift ;;
    --base-only) BASE_ONLY=1; shift ;;
    --cpu) CPU=1; shift ;;
    --offline) OFFLINE=1; shift ;;
    --no-venv) VENV=0; shift ;;
    --config.*) OVERRIDES+=("$1"); shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
done
# Another depth is another model: give it its own run (checkpoints) unless one is named. The tokenizer is the config
# file's (same data, same vocabulary), so every depth and run of one recipe shares it.
if [[ -n "$DEPTH" ]]; then OVERRIDES+=("--config.depth=$DEPTH"); RUN=${RUN:-d$DEPTH}; fi
if [[ -n "$RUN" ]]; then OVERRIDES+=("--config.run=$RUN"); fi
ARGS=("--config=$CONFIG" "${OVERRIDES[@]}")

export OMP_NUM_THREADS=1  # the data pipeline's threads, not XLA's, do the CPU work
export JAXCHAT_HOME=${JAXCHAT_HOME:-$HOME/.cache/jaxchat}
if [[ $CPU == 1 ]]; then export JAX_PLATFORMS=cpu; fi
if [[ $OFFLINE == 1 ]]; then export JAXCHAT_OFFLINE=1; fi

# ---- 1. Python environment: a venv with the pinned stack (CUDA 12 jax on GPU, see requirements.txt's header)
if [[ $VENV == 1 ]]; then
  [[ -x .venv/bin/python ]] || python3.12 -m venv .venv
  PY=.venv/bin/python
  JAX_VERSION=$(grep -E '^jax==' requirements.txt | cut -d= -f3)
  if [[ $CPU == 1 ]]; then WANT=(-r requirements.txt); else WANT=(-r requirements.txt "jax[cuda12]==$JAX_VERSION"); fi
  STAMP="$(cat requirements.txt) ${WANT[*]}"
  if [[ "$(cat .venv/.jaxchat-installed 2>/dev/null)" != "$STAMP" ]]; then
    "$PY" -m pip install -q "${WANT[@]}"
    printf '%s' "$STAMP" > .venv/.jaxchat-installed
  fi
else
  PY=${PYTHON:-python3.12}
fi

# What the config resolves to: run name, tokenizer name and the train shards its horizon needs with its packing
# (jaxchat.config.data_plan, the number `python -m jaxchat.config ... --shards-needed` prints: the dataset's chars
# per shard and per token, best-fit's crop, plus 10% spare; 237 for d20's stream packing). 0: unknown.
read -r RUN TOKENIZER NEED_SHARDS DATASET < <("$PY" - "${ARGS[@]}" <<'EOF'
import sys
from jaxchat import config as C
c = C.load_config(sys.argv[1:])
d = C.derive(c, 8)
plan = C.data_plan(c, d)
print(c.run, c.tokenizer or c.run, plan.shards_needed if plan else 0, c.dataset)
EOF
)
[[ -n "${NEED_SHARDS:-}" ]] || { echo "error: could not read the config (see above)" >&2; exit 2; }
if [[ $NEED_SHARDS == 0 && -z "$SHARDS" && $OFFLINE == 0 ]]; then
  echo "error: the shards this config's horizon needs are unknown for its dataset; pass --shards N" >&2; exit 2
fi
SHARDS=${SHARDS:-$NEED_SHARDS}
STATE="$JAXCHAT_HOME/runs/$RUN/speedrun"
mkdir -p "$STATE/logs"
echo "speedrun: run $RUN, config $CONFIG ${OVERRIDES[*]}, JAXCHAT_HOME=$JAXCHAT_HOME, logs in $STATE/logs"

# step NAME CMD...: run once (skipped when its marker exists), output to the console and NAME.log
step() {
  local name=$1; shift
  if [[ -f "$STATE/$name.done" ]]; then echo "== $name: done earlier, skipping"; return; fi
  echo "== $name: $*"
  local t0=$SECONDS rc
  "$@" 2>&1 | tee -a "$STATE/logs/$name.log"
  rc=${PIPESTATUS[0]}
  [[ $rc == 0 ]] || return "$rc"
  touch "$STATE/$name.done"
  echo "== $name: finished in $((SECONDS - t0))s"
}

# ---- 2. Will it fit? The real train step and engine compiled for this node's GPUs, on the CPU, before anything is
# downloaded or trained (python -m jaxchat.dryrun: XLA's per-device memory at JAX's default 75% preallocation).
if [[ $CPU == 0 ]]; then
  NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [[ "${NGPU:-0}" -gt 0 ]] || NGPU=8  # no nvidia-smi here: plan for the 8-GPU node the recipe is for
  GPU_GIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -n1 \
            | awk '{printf "%d", $1 / 1024}' || true)
  if ! step dryrun "$PY" -m jaxchat.dryrun "${ARGS[@]}" --devices="${NGPU:-8}" --device-memory-gib="${GPU_GIB:-80}"; then
    echo "speedrun: stopped before training: the dry run says this config does not fit ${NGPU:-8} GPUs of" \
         "${GPU_GIB:-80} GiB (see $STATE/logs/dryrun.log); lower --config.device_batch_size or set" \
         "--config.remat" >&2
    exit 1
  fi
fi

# ---- 3. Data: 8 shards now (enough for the tokenizer), the rest and the task datasets in the background
DOWNLOAD_PID="" TASKS_PID=""
if [[ $OFFLINE == 0 ]]; then
  step data-first "$PY" -m jaxchat.data.download -n 8 --dataset "$DATASET"
  if [[ ! -f "$STATE/data-all.done" ]]; then
    ( "$PY" -m jaxchat.data.download -n "$SHARDS" --dataset "$DATASET" > "$STATE/logs/data-all.log" 2>&1 \
      && touch "$STATE/data-all.done" ) &
    DOWNLOAD_PID=$!
  fi
  if [[ $BASE_ONLY == 0 && ! -f "$STATE/tasks.done" ]]; then
    ( "$PY" -m jaxchat.data.hub fetch-all > "$STATE/logs/tasks.log" 2>&1 && touch "$STATE/tasks.done" ) &
    TASKS_PID=$!
  fi
fi
wait_for() {  # wait_for PID WHAT: a failed background download stops the run here, with its log
  [[ -z "$1" ]] && return
  echo "== waiting for $2 (log: $STATE/logs/$3.log)"
  wait "$1" || { echo "error: $2 failed; see $STATE/logs/$3.log, then re-run this script" >&2; exit 1; }
}

# ---- 4. Tokenizer (trained on the first shards, while the rest download)
if [[ -f "$JAXCHAT_HOME/tokenizer/$TOKENIZER/tokenizer.json" ]]; then touch "$STATE/tokenizer.done"; fi
step tokenizer "$PY" train.py "${ARGS[@]}" --stage=tokenizer

# Each stage below is one `train.py --stage=X`: it trains, then evaluates its last checkpoint once (CORE for base,
# the chat evaluations after), skipping an evaluation eval.json already holds for that step (stages.run_stage).
# ---- 5. Base pretraining, then CORE
wait_for "$DOWNLOAD_PID" "the download of $SHARDS shards" data-all
step base "$PY" train.py "${ARGS[@]}" --stage=base

# ---- 6. Mid-training and SFT, each followed by the chat evaluations
if [[ $BASE_ONLY == 0 ]]; then
  wait_for "$TASKS_PID" "the task datasets" tasks
  step mid "$PY" train.py "${ARGS[@]}" --stage=mid
  step sft "$PY" train.py "${ARGS[@]}" --stage=sft
fi

# ---- 7. Optional RL on GSM8K, then its evaluation
if [[ $WITH_RL == 1 && $BASE_ONLY == 0 ]]; then
  step rl "$PY" train.py "${ARGS[@]}" --stage=rl
fi

# ---- 8. The report card (always re-rendered: it is cheap and reflects whatever has run)
"$PY" -m jaxchat.evaluate.report "${ARGS[@]}" 2>&1 | tee "$STATE/logs/report.log"
echo "speedrun: done. Report: $JAXCHAT_HOME/runs/$RUN/report.md"
if [[ $BASE_ONLY == 1 ]]; then
  echo "CORE (the leaderboard's measure): $JAXCHAT_HOME/runs/$RUN/base/eval.json"
else
  echo "chat with it: $PY -m jaxchat.chat ${ARGS[*]} --stage=$([[ $WITH_RL == 1 ]] && echo rl || echo sft)"
fi
