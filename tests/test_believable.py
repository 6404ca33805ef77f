"""Ground truths that vary the class make-up, common random numbers, and the class measures."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attribution.config import FeaturizeConfig
from attribution.evaluation.class_signal import class_measures, steps_of_timesteps
from attribution.evaluation.designs import capped_allocation, design_subsets, kmeans
from attribution.features import draw_timesteps_and_noise

LABELS = np.repeat(np.arange(10), 30)


def test_dirichlet_subsets_keep_their_size_and_vary_the_class_make_up():
    s = design_subsets("dirichlet", LABELS, 40, 0.5, seed=3, alpha=1.0)
    assert s.shape == (40, 300) and s.dtype == bool
    assert (s.sum(1) == 150).all()
    shares = np.stack([s[:, LABELS == c].mean(1) for c in range(10)], axis=1)  # (m, C) kept fraction per class
    assert shares.std(0).min() > 0.15  # every class is sometimes mostly kept, sometimes mostly dropped
    assert shares.min() == 0.0 and shares.max() == 1.0
    assert np.array_equal(s, design_subsets("dirichlet", LABELS, 40, 0.5, seed=3, alpha=1.0))


def test_stratified_subsets_fix_the_class_make_up():
    s = design_subsets("stratified", LABELS, 8, 0.5, seed=0)
    assert (np.stack([s[:, LABELS == c].sum(1) for c in range(10)]) == 15).all()


@pytest.mark.parametrize("total", [0, 7, 150, 300])
def test_capped_allocation_sums_to_total_within_caps(total):
    rng = np.random.default_rng(total)
    caps = np.full(10, 30)
    counts = capped_allocation(rng.dirichlet(np.full(10, 0.3)), caps, total)
    assert counts.sum() == total and (counts <= caps).all() and (counts >= 0).all()


def test_groups_design_leaves_out_each_class_then_each_style_cluster():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(300, 4)) + 5 * (np.arange(300) % 2)[:, None]  # two clear styles in every class
    s = design_subsets("groups", LABELS, 0, 0.5, seed=0, clusters_per_class=2, embed=lambda: emb)
    removed = ~s
    assert removed.shape == (30, 300)
    for c in range(10):
        assert np.array_equal(removed[c], LABELS == c)
    clusters = removed[10:]
    assert np.array_equal(clusters.sum(0), np.ones(300))  # the clusters partition the training set
    for g in clusters:
        assert len(np.unique(LABELS[g])) == 1
        assert len(np.unique(np.arange(300)[g] % 2)) == 1  # k-means found the two styles


def test_kmeans_separates_blobs_deterministically():
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(size=(20, 2)), rng.normal(size=(20, 2)) + 10])
    a = kmeans(x, 2, np.random.default_rng(5))
    assert len(set(a[:20])) == 1 and len(set(a[20:])) == 1 and a[0] != a[-1]
    assert np.array_equal(a, kmeans(x, 2, np.random.default_rng(5)))


def test_common_draws_are_shared_by_every_example_and_per_example_draws_are_not():
    idx = np.array([0, 5, 17])
    common = FeaturizeConfig(num_draws=4, draw_sharing="common")
    t, eps = draw_timesteps_and_noise(idx, common, 1000, (1, 8, 8))
    assert torch.equal(t[0], t[1]) and torch.equal(t[0], t[2]) and torch.equal(eps[0], eps[2])
    t2, eps2 = draw_timesteps_and_noise(np.array([9]), common, 1000, (1, 8, 8))  # chunking does not matter
    assert torch.equal(t2[0], t[0]) and torch.equal(eps2[0], eps[0])
    t3, eps3 = draw_timesteps_and_noise(idx, FeaturizeConfig(num_draws=4), 1000, (1, 8, 8))
    assert not torch.equal(eps3[0], eps3[1])


def test_draw_sharing_is_recorded_only_when_set_and_refuses_unknown_values():
    assert "draw_sharing" not in FeaturizeConfig().to_dict()  # stores built before the setting still match
    d = FeaturizeConfig(draw_sharing="common").to_dict()
    assert d["draw_sharing"] == "common"
    assert FeaturizeConfig.from_dict(d).draw_sharing == "common"
    with pytest.raises(ValueError, match="draw_sharing"):
        FeaturizeConfig(draw_sharing="some")


def test_class_measures_read_the_top_and_bottom_and_the_class_sums():
    labels = np.array([0, 0, 1, 1, 2, 2])
    scores = np.array([[5.0, 4.0, -1.0, -2.0, 0.5, 0.0],   # class 0 on top, class 1 at the bottom
                       [-3.0, -4.0, 1.0, 2.0, 0.0, 0.1]])
    m = class_measures(scores, labels, sample_class=0, top_k=2, num_classes=3)
    assert m["top_pos_share"].tolist() == [1.0, 0.0]
    assert m["top_neg_share"].tolist() == [0.0, 1.0]
    assert np.allclose(m["class_sums"][0], [9.0, -3.0, 0.5])
    assert m["argmax_is_class"].tolist() == [True, False]


def test_steps_of_timesteps_names_a_missing_timestep():
    ts = torch.arange(980, -1, -20)
    assert steps_of_timesteps(ts, (980, 480, 0)) == [0, 25, 49]
    with pytest.raises(ValueError, match="479"):
        steps_of_timesteps(ts, (479,))


def test_group_metrics_score_a_perfect_and_a_reversed_predictor():
    from attribution.evaluation.group_counterfactual import group_metrics, measured_changes, seed_agreement

    rng = np.random.default_rng(0)
    removed = np.eye(6, dtype=bool).repeat(2, axis=1)  # 6 groups of 2 examples, N = 12
    scores = rng.normal(size=(3, 2, 12))  # (Q, S, N)
    delta = np.einsum("qsn,gn->qsg", scores, removed.astype(float))  # a method that is exactly right
    good = group_metrics(scores, removed, delta)
    assert np.allclose(good["spearman"], 1.0) and np.allclose(good["sign_agreement"], 1.0)
    bad = group_metrics(-scores, removed, delta)
    assert np.allclose(bad["spearman"], -1.0) and np.allclose(bad["sign_agreement"], 0.0)
    full = rng.normal(size=(2, 3, 2))  # (R, Q, S)
    group_truth = full[:, None] + delta.transpose(2, 0, 1)[None]  # both seeds measure the same change
    assert np.allclose(measured_changes(group_truth, full), delta)
    assert np.allclose(seed_agreement(group_truth, full), 1.0)


def test_group_influence_sums_shares_and_top_k_make_up():
    from attribution.scoring.groups import group_influence

    scores = np.array([3.0, 1.0, -2.0, 0.5, -0.5, 0.0])
    groups = np.array([0, 0, 1, 1, 2, 2])
    gi = group_influence(scores, groups, ["a", "b", "c"], top_k=2)
    assert np.allclose(gi.sums, [4.0, -1.5, -0.5]) and gi.strongest == 0
    assert np.allclose(gi.positive_share, [4.0 / 4.5, 0.5 / 4.5, 0.0])
    assert np.allclose(gi.negative_share, [0.0, 0.8, 0.2])
    assert gi.top_positive_counts.tolist() == [2, 0, 0] and gi.top_negative_counts.tolist() == [0, 1, 1]
    with pytest.raises(ValueError, match="group ids"):
        group_influence(scores, groups + 1, ["a", "b", "c"])
