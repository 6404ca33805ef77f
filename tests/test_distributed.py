"""Distributed featurize: torchrun with 2 CPU processes (gloo) builds the same store as one process.

``python -m torch.distributed.run --standalone --nproc_per_node=2 -m attribution.cli
featurize --distributed ...`` on the tiny models of conftest: the features must equal
a single-process build byte for byte, the kernels exactly; a store whose shard was
interrupted resumes only the missing rows; a mismatching store stops every rank.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from attribution.features import Store

TIMEOUT = 120
# Every featurize batch holds 4 rows, in one process (24 rows) and in each of 2 ranks (12 rows):
# the sparse projection (a CSR x dense matmul) rounds differently for different batch widths
# (1 ulp), so byte equality needs equal batch shapes; the gradients themselves do not depend on it.
BATCH = 4


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"  # torchrun's default for its workers; the reference uses the same
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _featurize_args(model_dirs, data: Path, store: Path, proj_dim: int = 64, device: str = "cpu") -> list[str]:
    args = ["featurize", "--data", str(data), "--store", str(store), "--proj-dim", str(proj_dim),
            "--num-draws", "2", "--batch-size", str(BATCH), "--device", device]
    for d in model_dirs:
        args += ["--model", str(d)]
    return args


def _single(model_dirs, data, store, **kw) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "attribution.cli", *_featurize_args(model_dirs, data, store, **kw)]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=TIMEOUT)


def _torchrun(model_dirs, data, store, nproc: int = 2, **kw) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "attribution.cli", *_featurize_args(model_dirs, data, store, **kw), "--distributed"]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=TIMEOUT)


def _check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"


def _assert_same_store(a: Path, b: Path) -> None:
    sa, sb = Store.open(a), Store.open(b)
    assert sa.num_checkpoints == sb.num_checkpoints == 2
    assert sa.is_complete() and sb.is_complete()
    for m in range(sa.num_checkpoints):
        assert (a / f"features_{m}.npy").read_bytes() == (b / f"features_{m}.npy").read_bytes()
        assert (a / f"done_{m}.npy").read_bytes() == (b / f"done_{m}.npy").read_bytes()
        np.testing.assert_array_equal(np.load(a / f"kernel_{m}.npy"), np.load(b / f"kernel_{m}.npy"))
    ma, mb = sa.manifest, sb.manifest
    for key in ("settings", "checkpoints", "dataset", "num_params", "proj_dim", "kernels"):
        assert ma[key] == mb[key], key


@pytest.fixture(scope="module")
def setup(tiny_model_dirs, tiny_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    data = root / "tiny.npz"
    np.savez(data, images=tiny_dataset.array, labels=tiny_dataset.labels)
    ref = root / "single"
    _check(_single(tiny_model_dirs, data, ref))
    return root, data, ref


def test_two_processes_equal_one_byte_for_byte(setup, tiny_model_dirs):
    root, data, ref = setup
    store = root / "two"
    proc = _torchrun(tiny_model_dirs, data, store)
    _check(proc)
    assert "store ready" in proc.stdout and "2 processes" in proc.stdout
    _assert_same_store(store, ref)


def test_interrupted_shard_resumes(setup, tiny_model_dirs):
    """A store with rank 1's shard half done (and no kernels, as after a crash) is completed
    by rerunning the same command; only the missing rows are recomputed."""
    root, data, ref = setup
    store = root / "resumed"
    _check(_torchrun(tiny_model_dirs, data, store))
    # simulate a crash of rank 1 half-way through its shard: rows not done, garbage in them, no kernels
    manifest = json.loads((store / "manifest.json").read_text())
    lost = np.arange(1, 24, 2)[4:]  # rank 1's rows (i % 2 == 1) after its first batch
    for m in range(2):
        done = np.load(store / f"done_{m}.npy", mmap_mode="r+")
        done[lost] = 0
        done.flush()
        feats = np.load(store / f"features_{m}.npy", mmap_mode="r+")
        feats[lost] = 123.0
        feats.flush()
        del done, feats
        (store / f"kernel_{m}.npy").unlink()
    manifest["kernels"] = {}
    (store / "manifest.json").write_text(json.dumps(manifest, indent=2))
    assert not Store.open(store).is_complete()
    proc = _torchrun(tiny_model_dirs, data, store)
    _check(proc)
    assert "resuming" in proc.stdout + proc.stderr  # rank 1 found its finished rows
    _assert_same_store(store, ref)


def test_mismatching_store_stops_every_rank(setup, tiny_model_dirs):
    root, data, ref = setup
    proc = _torchrun(tiny_model_dirs, data, ref, proj_dim=32)  # ref was built with proj_dim 64
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "proj_dim" in out and "differs" in out


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="no CUDA device on this machine")
def test_nccl_ranks_on_gpus_build_the_cpu_store(setup, tiny_model_dirs):
    """One rank per GPU (nccl): the same store as the single-process CPU build, up to float rounding."""
    import torch

    root, data, ref = setup
    store = root / "nccl"
    proc = _torchrun(tiny_model_dirs, data, store, nproc=torch.cuda.device_count(), device="cuda")
    _check(proc)
    assert "store ready" in proc.stdout
    for m in range(2):
        a, b = np.load(ref / f"features_{m}.npy"), np.load(store / f"features_{m}.npy")
        np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-5 * np.abs(a).max())
