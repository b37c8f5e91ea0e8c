#!/usr/bin/env bash
# The checks that need a GPU, in stages that each fit one call of the device tool (10 minutes),
# for a session lent an H100 / H200 (no network there; Python 3.12 with torch and triton).
#
# Here, once per checkout (the device lacks msgspec and pyzmq; .whl/ is git-excluded):
#     bash scripts/gpu_checks.sh fetch-wheels
# Then on the device, carrying [".whl"], one stage per call:
#     bash scripts/gpu_checks.sh tests      # the kernel, model, graph, FP8-cache and sampler tests on CUDA
#     bash scripts/gpu_checks.sh kernels    # benchmarks/kernels.py (DeepSeek-V3 shapes) -> $OUT/kernels.json
#     bash scripts/gpu_checks.sh engine     # decode graphs, sampler, offline throughput on the small checkpoint,
#                                           # the start-up memory measurement (engine/memory_profile.py)
# Logs go to $OUT (the device tool brings that folder back) or ./gpu_out.
set -euo pipefail
cd "$(dirname "$0")/.."
stage=${1:?"stage: fetch-wheels, tests, kernels or engine"}

if [ "$stage" = fetch-wheels ]; then
    exclude=$(git rev-parse --git-path info/exclude)
    mkdir -p "$(dirname "$exclude")"
    grep -qx '/.whl/' "$exclude" 2>/dev/null || echo /.whl/ >> "$exclude"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl msgspec==0.22.0 pyzmq==27.3.0
    ls .whl
    exit 0
fi

out=${OUT:-gpu_out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=$PWD:/tmp/site TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"

case "$stage" in
tests)
    # Each of these picks CUDA when torch sees a GPU; on CUDA the kernels compile for real.
    python3 -m pytest -q -x tests/test_kernels.py tests/test_model_kernels.py tests/test_latent_fp8.py \
        tests/test_decode_graphs.py tests/test_sampler.py tests/test_memory_profile.py tests/test_tier_store.py \
        2>&1 | tee "$out/tests.log"
    ;;
kernels)
    python3 benchmarks/kernels.py --json "$out/kernels.json" 2>&1 | tee "$out/kernels.log"
    ;;
engine)
    python3 benchmarks/decode_graphs.py 2>&1 | tee "$out/decode_graphs.log"
    python3 benchmarks/decode_graphs.py --spec 2 --batch 1 8 64 2>&1 | tee "$out/decode_graphs_spec.log"
    python3 benchmarks/sampling.py --device cuda --batch 8 64 256 2>&1 | tee "$out/sampling.log"
    python3 benchmarks/throughput.py --num-requests 256 --kv-cache-memory $((8 << 30)) 2>&1 | tee "$out/throughput.log"
    # The cache sized by gpu_memory_utilization after the measured step: its line names both.
    python3 -m entrypoints.cli generate --model checkpoints/small-seed0 --prompt hello --max-tokens 4 \
        2>&1 | tee "$out/memory_profile.log"
    ;;
*)
    echo "unknown stage $stage" >&2
    exit 2
    ;;
esac
