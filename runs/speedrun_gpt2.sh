#!/usr/bin/env bash
# nanochat's time-to-GPT-2 measurement (the leaderboard's, 2026): configs/d24.py (Run 6: d24, 8 tokens per scaling
# parameter, ClimbMix, best-fit packing) on one 8-GPU node: tokenizer, base training, then CORE (GPT-2 scores 0.2565;
# the record 0.2626 in 1.65 h on 8xH100). The reference downloads 170 ClimbMix shards for it.
#
#   bash runs/speedrun_gpt2.sh                 # any runs/speedrun.sh option or --config.x=y override may follow
#
# Resumable like runs/speedrun.sh, which it is, with --config configs/d24.py --base-only --shards 170.
set -euo pipefail
exec bash "$(dirname "${BASH_SOURCE[0]}")/speedrun.sh" --config configs/d24.py --base-only --shards 170 "$@"
