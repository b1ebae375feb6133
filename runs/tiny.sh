#!/usr/bin/env bash
# The speedrun's pipeline at toy scale, offline on a CPU: configs/tiny.py (4 layers, 256 wide) on the embedded
# corpus and synthetic chat tasks, tokenizer -> base -> eval -> mid -> eval -> SFT -> eval -> report, in minutes.
#
#   bash runs/tiny.sh            # add --rl for the RL stage, --no-venv to use your own python, --config.x=y to override
#
# Same resumability and logs as runs/speedrun.sh (markers and logs in $JAXCHAT_HOME/runs/tiny/speedrun/).
set -euo pipefail
exec bash "$(dirname "${BASH_SOURCE[0]}")/speedrun.sh" --config configs/tiny.py --cpu --offline "$@"
