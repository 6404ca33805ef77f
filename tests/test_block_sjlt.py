"""The block sparse sketch and journey-groups (attribution.features.projection.block_sjlt, attribution.scoring.group_weights).

* the block sketch is block diagonal (group g's columns write only rows R_g, nnz signs each), its hooks path
  equals projecting the full per-example gradients, and the groups split d evenly;
* journey-groups equals sum_g w_g Phi_g (K_g + lambda_g I)^-1 q_g by explicit solves, averaged over checkpoints;
  weight on one group alone is that group's TRAK score; journey-TRAK still scores the same store;
* the weight fit is label-free, saved per ridge and bound to the store: another ridge, other features,
  a corrupt file or a non-block store are refused in one line; the CLI fits and attributes.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from attribution.config import FeaturizeConfig, QueryConfig, SamplingConfig
from attribution.data import ArrayDataset
from attribution.features import featurize
from attribution.features.featurize import checkpoint_projector, draw_timesteps_and_noise
from attribution.features.gradients import DrawBatch, GradientTarget, per_example_grads, select_params
from attribution.features.outputs import get_output
from attribution.features.projection import BlockSparseSignProjector, group_dims
from attribution.features.store import Store, StoreError
from attribution.sampling.trajectory import sample_trajectory
from attribution.scoring.group_fit import fit_group_weights
from attribution.scoring.group_weights import (GROUP_WEIGHTS_FILE, GroupWeightsFit, group_weights_status,
                                               load_group_weights, save_group_weights)
from attribution.scoring.param_groups import ParamGroupWeights
from attribution.scoring.scorer import Scorer

CFG = FeaturizeConfig(proj_kind="block-sjlt", proj_dim=64, num_draws=2, store_dtype="float32")


@pytest.fixture(scope="module")
def block_store(tiny_models, tiny_dataset, tmp_path_factory):
    store = featurize(tiny_models, tiny_dataset, tmp_path_factory.mktemp("block") / "store", CFG)
    fit = fit_group_weights(store, tiny_models, tiny_dataset, QueryConfig(num_resamples=3), num_self=16, fit_share=0.5)
    save_group_weights(store, fit)
    return store, fit


def _projector(model, dim=64, seed=0):
    params = select_params(model)
    return params, checkpoint_projector(replace(CFG, proj_dim=dim, proj_seed=seed), sum(p.numel() for p in params.values()),
                                        0, "cpu", params)


def test_group_dims_split_evenly_in_multiples_of_nnz():
    assert group_dims(64, 8, 4) == [8] * 8
    assert group_dims(40, 3, 4) == [16, 12, 12] and sum(group_dims(2048, 10, 4)) == 2048
    with pytest.raises(ValueError, match="divisible"):
        group_dims(30, 3, 4)
    with pytest.raises(ValueError, match=">= 40"):
        group_dims(32, 10, 4)


def test_block_sketch_is_block_diagonal(tiny_models):
    params, proj = _projector(tiny_models[0])
    assert isinstance(proj, BlockSparseSignProjector) and len(proj.groups) >= 6
    mat = proj.matrix()
    for group, rows in zip(proj.groups, proj.row_slices):
        block = mat[:, group.start : group.stop]
        outside = torch.ones(mat.shape[0], dtype=torch.bool)
        outside[rows] = False
        assert block[outside].abs().max() == 0, group.name
        assert torch.equal((block != 0).sum(0), torch.full((group.size,), proj.nnz))
        torch.testing.assert_close(block[block != 0].abs(), torch.full_like(block[block != 0], proj.nnz**-0.5))
    grads = torch.randn(3, proj.dim_in, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(proj.project(grads), grads @ mat.T, rtol=1e-5, atol=1e-5)
    _, other = _projector(tiny_models[0], seed=1)
    assert not torch.equal(other.matrix(), mat)


def test_block_train_features_equal_the_projected_gradients(tiny_models, tiny_dataset):
    model = tiny_models[0]
    params, proj = _projector(model)
    idx = np.arange(5)
    ts, noises = draw_timesteps_and_noise(idx, CFG, model.num_train_timesteps, model.image_shape)
    target = GradientTarget(model, params, get_output("loss"))
    batch = DrawBatch(tiny_dataset.images(idx), ts, noises)
    got = proj.example_features(target, batch, chunk_size=2)  # hooks, each layer projected as formed
    want = proj.project(per_example_grads(model, params, get_output("loss"), batch.x0, ts, noises))
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def _explicit_group_scores(store, models, scorer, traj, steps, weights, ridge):
    """(1/M) sum_m sum_g w_g Phi_g (Phi_g^T Phi_g + lambda_g I)^-1 q_g by dense solves in float64."""
    feats = scorer.query_features(traj, steps)
    total = 0
    for m in range(len(models)):
        phi = torch.from_numpy(store.read_rows(m, 0, store.num_train)).double()
        q = feats[m].double()
        for w, rows in zip(weights, scorer.projectors[m].row_slices):
            p = phi[:, rows]
            k = p.T @ p
            lam = ridge * float(torch.trace(k)) / k.shape[0]
            total = total + w * (p @ torch.linalg.solve(k + lam * torch.eye(k.shape[0], dtype=k.dtype), q[:, rows].T)).T
    return (total / len(models)).numpy()


def test_journey_groups_equals_explicit_per_group_solves(block_store, tiny_models):
    store, fit = block_store
    query = QueryConfig(num_resamples=3)
    traj = sample_trajectory(tiny_models[0], SamplingConfig(num_inference_steps=5, seed=0))
    scorer = Scorer(store, tiny_models, "journey-groups", query)
    got = scorer.score(traj, [1, 3]).scores
    want = _explicit_group_scores(store, tiny_models, scorer, traj, [1, 3], fit.weights.weights, query.ridge)
    assert np.abs(want).max() > 0
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())
    # weight on one group alone: that group's TRAK score
    g = 3
    scorer.group_weights = tuple(float(i == g) for i in range(len(fit.weights.weights)))
    alone = scorer.score(traj, [1, 3]).scores
    np.testing.assert_allclose(alone, _explicit_group_scores(store, tiny_models, scorer, traj, [1, 3],
                                                             scorer.group_weights, query.ridge),
                               rtol=1e-3, atol=1e-4 * np.abs(alone).max())
    assert not np.allclose(alone, got)
    # journey-TRAK (one joint kernel) scores the same store, differently
    joint = Scorer(store, tiny_models, "journey", query).score(traj, [1, 3]).scores
    assert joint.shape == got.shape and not np.allclose(joint, got)


def test_fit_is_label_free_normalized_and_reported(block_store, tiny_models, tiny_dataset):
    store, fit = block_store
    w = np.asarray(fit.weights.weights)
    assert len(w) == len(Scorer(store, tiny_models, "journey", QueryConfig()).projectors[0].groups)
    assert (w >= 0).all() and abs(w.sum() - 1) < 1e-6
    assert np.isfinite([fit.held_out_zscore, fit.held_out_zscore_uniform, fit.held_out_zscore_joint]).all()
    # the fit never reads labels: the same images with other labels give the same weights
    relabelled = ArrayDataset(_uint8_images(tiny_dataset), labels=np.zeros(len(tiny_dataset), dtype=np.int64), name="tiny")
    again = fit_group_weights(store, tiny_models, relabelled, QueryConfig(num_resamples=3), num_self=16)
    np.testing.assert_allclose(again.weights.weights, fit.weights.weights, rtol=1e-6)


def _uint8_images(ds) -> np.ndarray:
    """(N, H, W) uint8 pixels of a one-channel dataset (its images are in [-1, 1])."""
    return ((ds.images(np.arange(len(ds)))[:, 0] + 1) * 127.5).round().numpy().astype(np.uint8)


def test_weights_are_kept_per_ridge_and_bound_to_the_store(block_store, tiny_models, tmp_path):
    store, fit = block_store
    assert group_weights_status(store, QueryConfig().ridge) is None
    assert "ridge 0.5" in group_weights_status(store, 0.5)
    with pytest.raises(StoreError, match="fit-group-weights"):
        Scorer(store, tiny_models, "journey-groups", QueryConfig(ridge=0.5))
    # a second ridge is added beside the first
    other = GroupWeightsFit(**{**fit.__dict__, "ridge": 0.5})
    save_group_weights(store, other)
    assert load_group_weights(store, 0.5).ridge == 0.5 and load_group_weights(store, fit.ridge) == fit
    # a copy of the file next to other features (another projection seed) is refused
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(store.root, copy)
    manifest = json.loads((copy / GROUP_WEIGHTS_FILE).read_text())
    manifest["binding"]["settings_sha256"] = "0" * 64
    (copy / GROUP_WEIGHTS_FILE).write_text(json.dumps(manifest))
    assert "other features or checkpoints" in group_weights_status(Store.open(copy), fit.ridge)
    (copy / GROUP_WEIGHTS_FILE).write_text("{not json")
    why = group_weights_status(Store.open(copy), fit.ridge)
    assert "not a readable group-weights file" in why and "\n" not in why


def test_non_block_store_is_refused(tiny_models, tiny_dataset, tmp_path):
    store = featurize(tiny_models, tiny_dataset, tmp_path / "plain", replace(CFG, proj_kind="sjlt"))
    why = group_weights_status(store, QueryConfig().ridge)
    assert "block-sjlt" in why
    with pytest.raises(StoreError, match="block-sjlt"):
        Scorer(store, tiny_models, "journey-groups", QueryConfig())
    with pytest.raises(StoreError, match="block-sjlt"):
        fit_group_weights(store, tiny_models, tiny_dataset, QueryConfig(), num_self=8)
    w = ParamGroupWeights.uniform(["a", "b"])
    assert w.weights == (0.5, 0.5)


def test_cli_featurize_fit_group_weights_attribute(tmp_path, tiny_model_dirs, tiny_dataset, monkeypatch):
    from attribution.cli import main

    npz = tmp_path / "d.npz"
    np.savez(npz, images=_uint8_images(tiny_dataset))
    store = tmp_path / "store"
    assert main(["featurize", "--model", str(tiny_model_dirs[0]), "--data", str(npz), "--store", str(store),
                 "--projection", "block-sjlt", "--proj-dim", "64", "--num-draws", "1", "--device", "cpu"]) == 0
    out = tmp_path / "s.npz"
    args = ["attribute", "--store", str(store), "--seed", "0", "--num-steps", "3", "--steps", "2", "--num-resamples", "2",
            "--method", "journey-groups", "--device", "cpu", "--out", str(out)]
    assert main(args) != 0 and not out.exists()  # no weights yet: a one-line error
    assert main(["fit-group-weights", "--store", str(store), "--data", str(npz), "--num-self", "12",
                 "--num-resamples", "2", "--device", "cpu"]) == 0
    assert main(args) == 0
    got = np.load(out)
    assert got["scores"].shape == (1, len(tiny_dataset)) and str(got["method"]) == "journey-groups"


def test_workspace_offers_journey_groups_only_with_fitted_weights(block_store, tiny_model_dirs, tiny_dataset, tmp_path):
    import shutil

    from attribution.workspace import Bundle, Workspace

    store, fit = block_store
    root = tmp_path / "bundle"
    shutil.copytree(store.root, root / "store")
    np.savez(root / "data.npz", images=tiny_dataset.array, labels=tiny_dataset.labels)
    bundle = Bundle(name="tiny block", model_dirs=tuple(tiny_model_dirs), data=str(root / "data.npz"),
                    stores={"loss": root / "store"}, classifier_dir=None)
    ws = Workspace(bundle, device="cpu", query=QueryConfig(num_resamples=3))
    assert "journey-groups" in ws.available_methods() and "journey" in ws.available_methods()
    key, traj = ws.generate(0, num_steps=4)
    scores = ws.scores(key, "journey-groups", [1, 3])
    want = Scorer(Store.open(root / "store"), ws.models, "journey-groups", ws.query).score(traj, [1, 3]).scores
    np.testing.assert_allclose(scores, want, rtol=1e-5, atol=1e-7)
    (root / "store" / GROUP_WEIGHTS_FILE).unlink()
    assert "journey-groups" not in Workspace(bundle, device="cpu").available_methods()
