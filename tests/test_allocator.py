"""glibc malloc tuning for featurize processes: applied where glibc is, and it changes no feature."""

from __future__ import annotations

import platform

import numpy as np

from attribution.config import FeaturizeConfig
from attribution.features import featurize
from attribution.tools import tune_malloc


def test_tune_malloc_changes_no_feature(tiny_models, tiny_dataset, tmp_path):
    cfg = FeaturizeConfig(proj_dim=32, num_draws=2)
    before = np.asarray(featurize(tiny_models, tiny_dataset, tmp_path / "a", cfg).features(0))
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert tune_malloc(64 << 20) is glibc
    after = np.asarray(featurize(tiny_models, tiny_dataset, tmp_path / "b", cfg).features(0))
    assert np.abs(before).max() > 0
    np.testing.assert_array_equal(after, before)
