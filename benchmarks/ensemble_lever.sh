#!/usr/bin/env bash
# Does a better-trained checkpoint carry more class signal? (issue 19, "retrain the ensemble if better models help")
#
# For each model directory given, builds a one-checkpoint journey-TRAK store with the bundled store's settings
# (d = 2048, sjlt, 8 log-stratified draws per example, float16) under runs/ensemble-lever/, then measures
#   - sample quality: share of 300 samples the digit classifier labels with confidence >= 0.9;
#   - the class measures (attribution bench class-signal) on validation samples (seed offset 50000).
# Resumable: a finished store or result is kept and skipped.
#
#   OMP_NUM_THREADS=1 bash benchmarks/ensemble_lever.sh assets/ensemble/ddpm-seed0 runs/ensemble-e120/ddpm-seed0
set -euo pipefail
out=runs/ensemble-lever
mkdir -p "$out"
num=${NUM_SAMPLES:-20}
offset=${SEED_OFFSET:-50000}
for model in "$@"; do
    name=$(echo "$model" | tr '/' '_')
    store="$out/store-$name"
    # featurize resumes a store and skips its finished rows
    attribution featurize --model "$model" --data digits --store "$store" --proj-dim 2048 --num-draws 8 \
        --timestep-sampling log-stratified --half
    [ -f "$out/quality-$name.json" ] || python benchmarks/sample_quality.py --models "$model" --num-samples 300 --seed 1 \
        --out "$out/quality-$name.json"
    res="$out/class-signal-$name-offset$offset-n$num.json"
    [ -f "$res" ] || attribution bench class-signal --store "$store" --methods journey --num-samples "$num" \
        --seed-offset "$offset" --timesteps 980 740 480 300 240 160 80 40 0 --threads 1 --out "$res"
done
