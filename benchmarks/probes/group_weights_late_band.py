"""Probe (exploratory, issue 19): journey-groups weights fitted on late-step self-queries only, and the
self-attribution of 24 uploaded training digits (seed 0) at the last 6 steps with the global and the late weights.

    OMP_NUM_THREADS=1 python benchmarks/probes/group_weights_late_band.py STORE   # a block-sjlt store of the bundled ensemble

Edit ``late`` / ``steps`` for another band (``late = [0]``, ``steps = [48, 49]``: t = 0 alone). Prints only.
"""
import io, json, sys, time
import numpy as np, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
from PIL import Image
from attribution.config import QueryConfig
from attribution.features import get_method
from attribution.features.store import Store
from attribution.scoring import Scorer
from attribution.scoring.group_fit import self_group_scores, self_query_set
from attribution.scoring.group_weights import GroupKernels, load_group_weights
from attribution.scoring.param_groups import fit_self_retrieval_weights, self_moments, zscores
from attribution.workspace import Workspace, default_bundle
import dataclasses
torch.set_num_threads(1)
store_dir = sys.argv[1]
bundle = dataclasses.replace(default_bundle(), stores={**default_bundle().stores, "loss": store_dir})
ws = Workspace(bundle, device="cpu")
sc = Scorer(Store.open(store_dir), ws.models, get_method("journey-groups"), QueryConfig(), dataset=ws.dataset)
store = sc.store
late = [100, 80, 60, 40, 20, 0]
idx, ts = self_query_set(400, store.num_train, late, 777)
t0 = time.time()
s, joint = self_group_scores(store, ws.models, sc.projectors, sc.params, ws.dataset, idx, ts, QueryConfig(), 777)
a, c = self_moments(s, torch.from_numpy(idx))
names = sc.projectors[0].group_names
w_late = fit_self_retrieval_weights(a[:200], c[:200], names)
print("late weights", {n: round(x, 3) for n, x in w_late.to_dict().items()}, f"{time.time()-t0:.0f}s")
glob = load_group_weights(store, 0.01).weights
for nm, w in [("global", glob.weights), ("late", w_late.weights)]:
    z = zscores(torch.tensor(w, dtype=torch.float64), a[200:], c[200:]).mean()
    # rank-1 rate of held-out self-queries
    tau = torch.einsum("g,gqn->qn", torch.tensor(w, dtype=torch.float32), s[:, 200:])
    r1 = (tau.argmax(1) == torch.from_numpy(idx[200:])).float().mean()
    print(nm, "held-out z", round(float(z), 2), "rank-1", round(float(r1), 3))
jr1 = (joint[200:].argmax(1) == torch.from_numpy(idx[200:])).float().mean()
print("joint rank-1", round(float(jr1), 3))
ids = np.random.default_rng(0).choice(ws.num_train, 24, replace=False)
steps = list(range(44, 50))
res = {"global": [], "late": []}
for i in ids:
    png = io.BytesIO(); Image.fromarray(ws.train_images([int(i)])[0][:, :, 0]).save(png, format="PNG")
    _, traj = ws.upload(png.getvalue(), num_steps=50)
    feats = sc.query_features(traj, steps)
    for nm, w in [("global", glob.weights), ("late", w_late.weights)]:
        sc.group_weights = tuple(w)
        res[nm].append([int((row > row[i]).sum()) for row in sc.scores_from_features(feats)])
for nm, r in res.items():
    r = np.array(r); print(nm, "first", (r == 0).sum(0).tolist(), f"{(r == 0).mean():.2f}")
