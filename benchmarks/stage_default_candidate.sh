#!/bin/bash
# Stage a candidate bundled default beside assets/ and recompute its counterfactual showcase (issue 19).
#
#   OMP_NUM_THREADS=1 bash benchmarks/stage_default_candidate.sh ENSEMBLE_DIR STORE_DIR OUT_DIR
#
# ENSEMBLE_DIR holds ddpm-seed0..2 (e.g. runs/ensemble-e120, 120-epoch retrains), STORE_DIR a finished loss store
# of them (e.g. runs/block/e120-2560, block-sjlt with group_weights.json). OUT_DIR/assets gets the digits and the
# classifier of assets/, the ensemble, the store without its kernels (derived at first use, as shipped), then the
# showcase recomputed against it (ATTRIBUTION_ASSETS=OUT_DIR/assets; each retraining resumes per epoch, finished
# ones are kept in OUT_DIR/cache), then its MANIFEST.json. Swapping it in is then: rm -r assets && cp -r OUT_DIR/assets assets.
set -euo pipefail
ENS=$1; STORE=$2; OUT=$3
REPO=$(cd "$(dirname "$0")/.." && pwd)
A=$OUT/assets
mkdir -p "$A/ensemble" "$A/store/journey" "$OUT/cache"
[ -d "$A/digits" ] || cp -r "$REPO/assets/digits" "$A/digits"
[ -d "$A/classifier" ] || cp -r "$REPO/assets/classifier" "$A/classifier"
for s in 0 1 2; do [ -d "$A/ensemble/ddpm-seed$s" ] || cp -r "$ENS/ddpm-seed$s" "$A/ensemble/ddpm-seed$s"; done
if [ ! -f "$A/store/journey/manifest.json" ]; then
  for f in "$STORE"/*; do case $(basename "$f") in kernel_*) ;; *) cp "$f" "$A/store/journey/";; esac; done
  python - "$A/store/journey/manifest.json" <<'PY'
import json, sys
p = sys.argv[1]; m = json.load(open(p))
for s, c in enumerate(m["checkpoints"]):
    c["path"] = f"../../ensemble/ddpm-seed{s}"  # where the staged ensemble is (paths are not bound settings)
m["kernels"] = {}  # as shipped: derived at first use into the kernel cache
json.dump(m, open(p, "w"), indent=1)
PY
fi
export ATTRIBUTION_ASSETS=$A
python "$REPO/benchmarks/showcase.py" --rules top random --out "$A/showcase" --cache "$OUT/cache"
python -c "import sys; sys.path.insert(0, '$REPO'); from pathlib import Path; from attribution.tools.assets import write_manifest; print(write_manifest(Path('$A')))"
echo STAGED "$A"
