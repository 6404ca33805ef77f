"""LDS, Spearman, DAS and destination methods, and the benchmark pipeline end to end on tiny data."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from attribution.evaluation.lds import lds, predicted_outputs, rankdata, spearman, summarize


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, size=(4, 30)).astype(float)
    b = rng.normal(size=(4, 30))
    ours = spearman(a, b)
    ref = [stats.spearmanr(a[i], b[i]).statistic for i in range(4)]
    np.testing.assert_allclose(ours, ref, atol=1e-12)
    np.testing.assert_allclose(rankdata([3.0, 1.0, 3.0]), [2.5, 1.0, 2.5])


def _linear_benchmark(rng, q=20, s=3, n=60, m=64, noise=0.0):
    scores = rng.normal(size=(q, s, n))
    subsets = rng.random((m, n)) < 0.5
    # a linear datamodel with the sign convention: including a positive example lowers f
    truth = np.moveaxis(-(scores @ subsets.T.astype(float)), -1, 0) + noise * rng.normal(size=(m, q, s))
    return scores, subsets, truth


def test_linear_datamodel_gives_lds_one():
    rng = np.random.default_rng(1)
    scores, subsets, truth = _linear_benchmark(rng)
    values = lds(scores, subsets, truth)
    np.testing.assert_allclose(values, 1.0, atol=1e-12)
    assert np.all(lds(scores, subsets, truth, sign=-1.0) < -0.99)


def test_shuffled_scores_give_lds_near_zero():
    rng = np.random.default_rng(2)
    scores, subsets, truth = _linear_benchmark(rng, q=40, noise=0.5)
    shuffled = rng.permuted(scores, axis=-1)
    s = summarize(lds(shuffled, subsets, truth))
    assert abs(s.overall) < 3 * s.overall_se + 0.05
    good = summarize(lds(scores, subsets, truth))
    assert good.overall > 0.9


def test_summary_standard_error():
    values = np.array([[0.1, 0.5], [0.3, np.nan], [0.5, 0.7]])
    s = summarize(values)
    np.testing.assert_allclose(s.mean, [0.3, 0.6])
    np.testing.assert_allclose(s.se[0], np.std([0.1, 0.3, 0.5], ddof=1) / np.sqrt(3))
    with pytest.raises(ValueError):
        lds(np.zeros((2, 3, 4)), np.zeros((5, 4), bool), np.zeros((5, 2, 2)))


def test_predicted_outputs_sum_over_subset():
    scores = np.array([[1.0, 2.0, 4.0]])
    subsets = np.array([[True, False, True], [False, True, False]])
    np.testing.assert_allclose(predicted_outputs(scores, subsets), [[-5.0, -2.0]])
