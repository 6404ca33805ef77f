#!/usr/bin/env bash
# LDS, group metrics and reports of the class-varying benchmarks, after run_believable_retrain.sh.
# Resumable: stores, query features and truths are cached in the work directories. One core:
#   nohup bash benchmarks/run_believable_lds.sh > benchmarks/logs/believable_lds.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
G=benchmarks/work-groups D=benchmarks/work-dirichlet R=benchmarks/results
METHODS="journey trak-final tracin retrac dtrak-square das pixel embedding"
attribution bench truth --work $G --replicates 3 --threads 1
python benchmarks/group_truth_diagnostics.py --work $G --replicates 3 --json $R/group_truth_diagnostics.json
attribution bench lds --work $G --replicates 3 --threads 1 --methods $METHODS
attribution bench lds --work $G --replicates 3 --threads 1 --methods journey tracin --draw-sharing common \
  --num-draws 16 --out-name lds_crn.json
attribution bench report --work $G --out $R/bench-groups
attribution bench lds --work $D --replicates 2 --threads 1 --methods $METHODS
attribution bench lds --work $D --replicates 2 --threads 1 --methods journey tracin --draw-sharing common \
  --num-draws 16 --out-name lds_crn.json
attribution bench report --work $D --out $R/bench-dirichlet
echo "all lds done"
