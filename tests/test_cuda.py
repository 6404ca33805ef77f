"""The CUDA path agrees with the CPU path (skipped where no GPU is present, as in CI).

The same seeds give the same projection matrices and the same (timestep, noise) draws on
every device, so a CUDA featurize, query or training run must match the CPU one up to
float rounding (cuDNN/cuBLAS reduction order, TF32 disabled by torch's defaults for fp32
matmuls). Run on a GPU machine with ``pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from attribution.config import FeaturizeConfig, QueryConfig, SamplingConfig, TrainConfig
from attribution.features import featurize
from attribution.models import load_models
from attribution.sampling import sample_trajectory
from attribution.scoring import Scorer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


@pytest.mark.parametrize("proj_kind", ["sjlt", "factorized", "gaussian"])
@pytest.mark.parametrize("output", ["loss", "square"])
def test_featurize_on_cuda_equals_cpu(tiny_model_dirs, tiny_dataset, tmp_path, proj_kind, output):
    cfg = FeaturizeConfig(proj_dim=32, num_draws=2, store_dtype="float32", proj_kind=proj_kind, output=output)
    cpu = featurize(load_models(tiny_model_dirs, "cpu"), tiny_dataset, tmp_path / "cpu", cfg)
    gpu = featurize(load_models(tiny_model_dirs, "cuda"), tiny_dataset, tmp_path / "gpu", cfg)
    for m in range(cpu.num_checkpoints):
        a, b = np.asarray(cpu.features(m)), np.asarray(gpu.features(m))
        np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-5 * np.abs(a).max())


def test_query_on_cuda_ranks_like_cpu(tiny_model_dirs, tiny_dataset, tmp_path):
    cfg = FeaturizeConfig(proj_dim=32, num_draws=2, store_dtype="float32")
    scores = {}
    for dev in ("cpu", "cuda"):
        models = load_models(tiny_model_dirs, dev)
        store = featurize(models, tiny_dataset, tmp_path / dev, cfg)
        traj = sample_trajectory(models[0], SamplingConfig(num_inference_steps=4, seed=0))
        mask = np.zeros((8, 8), dtype=np.float32)
        mask[2:6, 1:5] = 1
        scorer = Scorer(store, models, "journey", QueryConfig(num_resamples=3))
        scores[dev] = (scorer.score(traj).scores, scorer.score(traj, [2], mask=mask).scores)
    for cpu, gpu in zip(scores["cpu"], scores["cuda"]):
        assert cpu.shape == gpu.shape
        for row_cpu, row_gpu in zip(cpu, gpu):
            assert spearmanr(row_cpu, row_gpu).statistic > 0.999


def test_training_on_cuda_follows_the_cpu_run(tmp_path):
    from attribution.models import train_ddpm

    images = torch.rand(12, 1, 8, 8) * 2 - 1
    cfg = TrainConfig(epochs=2, batch_size=5, block_out_channels=(8, 16))
    mask = np.arange(12) % 3 != 0
    for name, kw in [("full", {}), ("coupled", {"subset": mask, "coupled": True})]:
        cpu = load_models([train_ddpm(images, tmp_path / f"{name}-cpu", cfg, **kw)])[0].unet.state_dict()
        gpu = load_models([train_ddpm(images, tmp_path / f"{name}-gpu", cfg, device="cuda", **kw)])[0].unet.state_dict()
        for key, value in cpu.items():
            np.testing.assert_allclose(gpu[key].numpy(), value.numpy(), rtol=1e-3, atol=1e-4, err_msg=f"{name}: {key}")
