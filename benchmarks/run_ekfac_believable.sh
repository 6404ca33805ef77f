#!/usr/bin/env bash
# EK-FAC / K-FAC on the believable-attributions measures (issue 23's targets), after run_believable_lds.sh:
# the group-counterfactual LDS beside journey-TRAK (same truth), and the class signal on the bundled default
# with factors fitted on a random 500 of its 4,000 training digits (a copy of the store: assets/ stay untouched).
# Resumable (factors and features are cached). One core:
#   nohup bash benchmarks/run_ekfac_believable.sh > benchmarks/logs/ekfac_believable.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
R=benchmarks/results
attribution bench lds --work benchmarks/work-groups --replicates 3 --threads 1 --methods ekfac kfac \
  --out-name lds_ekfac.json
attribution bench report --work benchmarks/work-groups --out $R/bench-groups
S=runs/stores/journey-ekfac
mkdir -p runs/stores
[ -e runs/ensemble ] || ln -s ../assets/ensemble runs/ensemble  # the store's checkpoints are ../../ensemble/...
[ -f $S/manifest.json ] || cp -r assets/store/journey $S
attribution fit-factors --store $S --max-examples 500
# damping 10: the relative damping chosen on the validation queries of the LDS sweep (bench_ekfac_lds.json)
attribution bench class-signal --store $S --methods ekfac --ridge 10 --num-samples 50 --seed-offset 0 \
  --timesteps 980 740 480 400 300 240 160 80 40 0 --threads 1 --out $R/class_signal_ekfac.json
echo "ekfac believable done"
