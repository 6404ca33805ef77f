#!/usr/bin/env bash
# Background retraining for the class-varying benchmarks (dirichlet subsets, group counterfactuals).
# Resumable: every stage skips finished models; rerun after an interruption. One core:
#   nohup bash benchmarks/run_believable_retrain.sh > benchmarks/logs/believable_retrain.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
G=benchmarks/work-groups D=benchmarks/work-dirichlet
[ -f $G/config.json ] || attribution bench prepare --work $G --design groups --coupled
[ -f $D/config.json ] || attribution bench prepare --work $D --design dirichlet --coupled
for r in 1 2 3; do
  attribution bench retrain --work $G --replicates $r --threads 1
  [ $r -le 2 ] && attribution bench retrain --work $D --replicates $r --threads 1
done
echo "all retraining done"
