#!/usr/bin/env bash
# The main job: sets up .venv if needed, then runs held-out chats (sorting digit lists)
# through the engine (scheduler + worker processes) on the embedded demo model (assets/demo,
# trained by `mlaserve train-demo`), printing completions, accuracy, throughput and what MTP
# speculative decoding buys. Arguments go to `mlaserve demo` (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec .venv/bin/mlaserve demo "$@"
