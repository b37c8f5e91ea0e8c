#!/usr/bin/env bash
# The main job: sets up .venv if needed, makes the `small` checkpoint once, and serves a batch of
# prompts through the engine (scheduler + worker processes), printing completions and throughput.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
ckpt=checkpoints/small-seed0
if [ ! -f "$ckpt/model.safetensors.index.json" ]; then
    .venv/bin/mlaserve make-checkpoint --preset small --seed 0 "$ckpt"
fi
prompts=$(mktemp)
trap 'rm -f "$prompts"' EXIT
for i in $(seq 1 32); do echo "request $i: 12+$i=" >> "$prompts"; done
exec .venv/bin/mlaserve generate --model "$ckpt" --prompts-file "$prompts" --max-tokens 64 --ignore-eos "$@"
