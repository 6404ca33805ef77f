"""Probe (exploratory, issue 19): the log-softmax (rank-like) objective instead of the z-score for journey-groups'
weights; self-attribution of 24 uploaded training digits (seed 1) at the last 6 steps with each, and a copy of
the store (hard links) carrying the log-softmax weights, for `attribution bench class-signal`.

    OMP_NUM_THREADS=1 python benchmarks/probes/group_weights_logsoftmax.py STORE COPY_DIR
"""
import io, sys, time, dataclasses, json
import numpy as np, torch
_ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]; sys.path.insert(0, str(_ROOT)); sys.path.insert(0, str(_ROOT / "benchmarks"))
from PIL import Image
from attribution.config import QueryConfig, SamplingConfig
from attribution.features import get_method
from attribution.features.store import Store
from attribution.scoring import Scorer
from attribution.scoring.group_fit import self_group_scores, self_query_set
from attribution.scoring.group_weights import load_group_weights, save_group_weights, GroupWeightsFit
from attribution.scoring.param_groups import fit_simplex_weights, self_moments, zscores, ParamGroupWeights
from attribution.sampling.steps import StepSampler
from layer_weighting import self_logsoftmax
from attribution.workspace import Workspace, default_bundle
torch.set_num_threads(1)
store_dir, out_dir = sys.argv[1], sys.argv[2]
bundle = dataclasses.replace(default_bundle(), stores={**default_bundle().stores, "loss": store_dir})
ws = Workspace(bundle, device="cpu")
sc = Scorer(Store.open(store_dir), ws.models, get_method("journey-groups"), QueryConfig(), dataset=ws.dataset)
store = sc.store
sched = [int(t) for t in StepSampler(ws.models[0], SamplingConfig()).timesteps]
idx, ts = self_query_set(800, store.num_train, sched, 12345)
s, joint = self_group_scores(store, ws.models, sc.projectors, sc.params, ws.dataset, idx, ts, QueryConfig(), 12345)
sidx = torch.from_numpy(idx)
w_ls = fit_simplex_weights(lambda w: self_logsoftmax(w, s[:, :400].double(), sidx[:400]).mean(), s.shape[0])
names = sc.projectors[0].group_names
print("logsoftmax weights", dict(zip(names, np.round(w_ls, 3).tolist())))
glob = load_group_weights(store, 0.01).weights.weights
ids = np.random.default_rng(1).choice(ws.num_train, 24, replace=False)
steps = list(range(44, 50))
res = {"zscore": [], "logsoftmax": []}
for i in ids:
    png = io.BytesIO(); Image.fromarray(ws.train_images([int(i)])[0][:, :, 0]).save(png, format="PNG")
    _, traj = ws.upload(png.getvalue(), num_steps=50)
    feats = sc.query_features(traj, steps)
    for nm, w in [("zscore", glob), ("logsoftmax", tuple(float(x) for x in w_ls))]:
        sc.group_weights = tuple(w)
        res[nm].append([int((row > row[i]).sum()) for row in sc.scores_from_features(feats)])
for nm, r in res.items():
    r = np.array(r); print(nm, "first", (r == 0).sum(0).tolist(), f"{(r == 0).mean():.2f}")
fit = load_group_weights(store, 0.01)
import shutil, os
os.makedirs(out_dir, exist_ok=True)
for f in os.listdir(store_dir):
    if f != "group_weights.json" and not os.path.exists(os.path.join(out_dir, f)):
        os.link(os.path.join(store_dir, f), os.path.join(out_dir, f))
s2 = Store.open(out_dir)
save_group_weights(s2, dataclasses.replace(fit, weights=ParamGroupWeights(tuple(names), tuple(float(x) for x in w_ls))))
print("wrote", out_dir)
