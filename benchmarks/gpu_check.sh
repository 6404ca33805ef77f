#!/bin/bash
# The CUDA checks and GPU timings in one run, on a machine with a CUDA GPU and a CUDA build of torch.
#
#   bash benchmarks/gpu_check.sh OUT_DIR          # from the repository root
#
# 1. tests/test_cuda.py and the nccl test of tests/test_distributed.py (CUDA == CPU up to rounding);
# 2. benchmarks/bench_traker.py --device cuda on the bundled default model and on the 10 M-parameter UNet:
#    ours vs traker (its CudaProjector when fast_jl builds, else its BasicProjector) vs plain fwd+bwd;
# 3. benchmarks/profile_featurize.py --device cuda --torch-profiler: where featurize spends GPU time.
# Where the machine cannot reach a package index, diffusers/traker wheels and the fast_jl source
# (traker's CUDA projector) are taken from .whl/ (see benchmarks/README.md, "GPU").
# Knobs (environment): N (default-model train examples, 2048), BS (featurize batch, 256),
# LARGE_N (large-model train examples, 512), QUICK=1 (bench_traker --quick: a smoke test of this script).
set -u
OUT=${1:-/tmp/gpu_check}
mkdir -p "$OUT"
DEVICE=${DEVICE:-cuda} N=${N:-2048} BS=${BS:-256} LARGE_N=${LARGE_N:-512}
export PYTHONUNBUFFERED=1
start=$(date +%s)
say() { echo "[gpu_check $(($(date +%s) - start)) s] $*"; }

if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:/tmp/fjl/site${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
python3 -c "import torch, diffusers, trak; print('torch', torch.__version__, 'cuda', torch.version.cuda,
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU', 'diffusers', diffusers.__version__)"

# fast_jl (traker's CUDA projector) compiles from source; its setup.py targets sm_70, which CUDA 13 dropped
FJL=""
if [ "$DEVICE" = cuda ] && [ -f .whl/fast_jl-0.1.3.tar.gz ]; then
    (rm -rf /tmp/fjl && mkdir -p /tmp/fjl && tar xzf .whl/fast_jl-0.1.3.tar.gz -C /tmp/fjl &&
        cd /tmp/fjl/fast_jl-0.1.3 && sed -i 's/7.0+PTX/9.0/' setup.py &&
        MAX_JOBS=8 python3 -m pip install -q --no-build-isolation --no-deps --no-index --target /tmp/fjl/site .
    ) > "$OUT/fast_jl_build.log" 2>&1 &
    FJL=$!
fi

say "pytest (CUDA agreement tests)"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_distributed.py -k "cuda or nccl" 2>&1 | tail -25

if [ -n "$FJL" ]; then  # wait up to 90 s more for the build, so every traker worker sees the same projector
    for _ in $(seq 90); do kill -0 "$FJL" 2> /dev/null || break; sleep 1; done
    kill "$FJL" 2> /dev/null && say "fast_jl build not finished: killed, traker uses its BasicProjector"
    wait "$FJL" 2> /dev/null
    python3 -c "import fast_jl" 2> /dev/null && say "fast_jl built" || { say "fast_jl unavailable"; tail -5 "$OUT/fast_jl_build.log"; rm -rf /tmp/fjl/site; }
fi

QUICK_ARGS=()
[ "${QUICK:-0}" = 1 ] && QUICK_ARGS=(--quick)
say "bench_traker, default model"
timeout 300 python3 benchmarks/bench_traker.py --device "$DEVICE" --skip-large --app-checkpoints 0 --repeats 1 --no-high-d \
    --n "$N" --batch-size "$BS" --timeout 200 "${QUICK_ARGS[@]}" --out "$OUT/bench_traker_${DEVICE}_default.json" 2>&1 | grep -v "^\[ *[0-9.]*s\] \[default\] .* \.\.\.$"
say "bench_traker, large model"
timeout 200 python3 benchmarks/bench_traker.py --device "$DEVICE" --skip-default --app-checkpoints 0 --repeats 1 --no-high-d \
    --large-n "$LARGE_N" --timeout 200 "${QUICK_ARGS[@]}" --out "$OUT/bench_traker_${DEVICE}_large.json" 2>&1 | grep -v "^\[ *[0-9.]*s\] \[large\] .* \.\.\.$"
say "profile_featurize"
timeout 90 python3 benchmarks/profile_featurize.py --device "$DEVICE" --n "$N" --batch-size "$BS" --projections sjlt factorized \
    --torch-profiler --model-dir assets/ensemble/ddpm-seed0 --out "$OUT/profile_featurize_${DEVICE}.json" 2>&1 | tail -60
say "done"
