"""Corrupt, edited and mismatched stores are refused with a message naming the problem and the fix;
``attribution doctor`` finds every injected fault; featurize recomputes rows that fail their checksum."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from attribution.cli import main
from attribution.config import FeaturizeConfig, QueryConfig, SamplingConfig
from attribution.data import ArrayDataset
from attribution.features import Store, StoreError, featurize
from attribution.sampling import sample_trajectory
from attribution.scoring import Scorer
from attribution.tools.doctor import healthy, run_doctor

CFG = FeaturizeConfig(proj_dim=16, num_draws=1, store_dtype="float32")


@pytest.fixture(scope="module")
def good_store(tiny_models, tiny_dataset, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults") / "good"
    featurize(tiny_models, tiny_dataset, root, CFG)
    return root


@pytest.fixture
def store_copy(good_store, tmp_path) -> Path:
    return Path(shutil.copytree(good_store, tmp_path / "store"))


def _score(root: Path, models) -> np.ndarray:
    traj = sample_trajectory(models[0], SamplingConfig(num_inference_steps=3, seed=0))
    return Scorer(Store.open(root), models, "journey", QueryConfig(num_resamples=2)).score(traj, [1]).scores


def _edit_bytes(path: Path, offset_from_end: int, value: bytes) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end : -offset_from_end + len(value) or None] = value
    path.write_bytes(bytes(data))


def _doctor(root: Path, capsys, *extra: str) -> tuple[int, str]:
    code = main(["doctor", "--store", str(root), *extra])
    return code, capsys.readouterr().out


def test_healthy_store_passes_doctor(good_store, tiny_model_dirs, capsys):
    code, out = _doctor(good_store, capsys, "-v")
    assert code == 0, out
    assert "healthy" in out.splitlines()[-1] and "matches its checksum" in out


def test_edited_feature_bytes_are_refused_then_recomputed(store_copy, tiny_models, tiny_dataset, good_store, capsys):
    """Same size, different bytes: scoring refuses, doctor names it, featurize recomputes the row."""
    path = store_copy / "features_1.npy"
    row_bytes = CFG.proj_dim * 4
    _edit_bytes(path, 3 * row_bytes, np.float32(123.0).tobytes())  # inside row N-3
    assert path.stat().st_size == (good_store / "features_1.npy").stat().st_size
    with pytest.raises(StoreError, match=r"do not match their checksums \(e\.g\. row 21\).*featurize"):
        _score(store_copy, tiny_models)
    code, out = _doctor(store_copy, capsys)
    assert code == 1 and "checkpoint 1: 1 row(s) marked done fail their checksum" in out and "fix:" in out

    logs: list[str] = []
    featurize(tiny_models, tiny_dataset, store_copy, CFG, log=logs.append)
    assert any("fail their checksum" in s and "recomputing" in s for s in logs)
    # a row recomputed alone differs from one computed in a batch only by float rounding
    fixed, want = np.load(path), np.load(good_store / "features_1.npy")
    np.testing.assert_allclose(fixed, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    assert np.abs(fixed).max() < 100
    np.testing.assert_allclose(_score(store_copy, tiny_models), _score(good_store, tiny_models), rtol=1e-4, atol=1e-6)


def test_done_mask_claiming_unwritten_rows(tiny_models, tiny_dataset, good_store, tmp_path, capsys):
    """Rows marked done that were never written (e.g. a done file copied in) are caught before any kernel."""
    class Stop(Exception):
        pass

    def stop(done, total):
        if done >= 10:
            raise Stop

    root = tmp_path / "partial"
    with pytest.raises(Stop):
        featurize(tiny_models, tiny_dataset, root, CFG, batch_size=5, progress=stop)
    store = Store.open(root, writable=True)
    for m in range(2):  # claims rows 10..23 of checkpoint 0 and all of checkpoint 1, never written
        store.done(m)[:] = 1
        store.done(m).flush()
    with pytest.raises(StoreError, match="never written"):
        Store.open(root, writable=True).finalize()
    code, out = _doctor(root, capsys)
    assert code == 1 and "checkpoint 0: 14 row(s) marked done fail their checksum" in out
    assert "checkpoint 1: 24 row(s) marked done fail their checksum" in out
    featurize(tiny_models, tiny_dataset, root, CFG)
    for m in range(2):
        got, want = np.load(root / f"features_{m}.npy"), np.load(good_store / f"features_{m}.npy")
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())  # batch-size rounding
    assert _doctor(root, capsys)[0] == 0


@pytest.mark.parametrize(
    "fault, message",
    [
        ("format", "format version 99, this program reads version 1; featurize again"),
        ("json", "not valid JSON"),
        ("keys", "lacks arrays"),
        ("truncated_done", "truncated or was replaced"),
        ("npy_header", "not a valid .npy file"),
        ("missing", "missing rowcrc_0.npy"),
    ],
)
def test_broken_files_are_refused_with_the_fix(store_copy, fault, message, capsys):
    manifest = store_copy / "manifest.json"
    if fault == "format":
        manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "format_version": 99}))
    elif fault == "json":
        manifest.write_text(manifest.read_text()[:-40])
    elif fault == "keys":
        m = json.loads(manifest.read_text())
        del m["arrays"]
        manifest.write_text(json.dumps(m))
    elif fault == "truncated_done":
        p = store_copy / "done_0.npy"
        p.write_bytes(p.read_bytes()[:-5])
    elif fault == "npy_header":
        p = store_copy / "done_1.npy"
        p.write_bytes(b"garbage!" + p.read_bytes()[8:])
    else:
        (store_copy / "rowcrc_0.npy").unlink()
    with pytest.raises(StoreError, match=message):
        s = Store.open(store_copy)
        [s.done(m) for m in range(s.num_checkpoints)]
    code, out = _doctor(store_copy, capsys)
    assert code == 1 and message.split(",")[0] in out


def test_edited_kernel_and_leftover_tmp(store_copy, tiny_models, capsys):
    (store_copy / ".manifest.json.tmp123").write_text("{")
    assert _doctor(store_copy, capsys)[0] == 0  # a leftover temporary file is only a warning
    _edit_bytes(store_copy / "kernel_0.npy", 8, np.float64(7.0).tobytes())
    with pytest.raises(StoreError, match="kernel_0.npy is missing or does not match its checksum; delete it"):
        _score(store_copy, tiny_models)
    code, out = _doctor(store_copy, capsys)
    assert code == 1 and "kernel_0.npy does not match its recorded sha256" in out
    assert ".manifest.json.tmp123 was left by an interrupted write" in out


def test_nonfinite_rows_are_reported(store_copy, capsys):
    store = Store.open(store_copy, writable=True)
    store.write_rows(0, np.array([4]), np.full((1, CFG.proj_dim), np.nan, np.float32))
    code, out = _doctor(store_copy, capsys)
    assert code == 1 and "1 done row(s) hold NaN or infinite values" in out


def test_other_models_and_data_are_named(good_store, tiny_model_dirs, tiny_dataset, tmp_path, capsys):
    np.savez(tmp_path / "same.npz", images=tiny_dataset.array)
    np.savez(tmp_path / "other.npz", images=tiny_dataset.array[::-1])
    models = [str(d) for d in tiny_model_dirs]
    assert _doctor(good_store, capsys, "--model", models[0], "--model", models[1], "--data", str(tmp_path / "same.npz"))[0] == 0
    code, out = _doctor(good_store, capsys, "--model", models[1], "--model", models[0])
    assert code == 1 and "is not checkpoint 0 of the store" in out
    code, out = _doctor(good_store, capsys, "--data", str(tmp_path / "other.npz"))
    assert code == 1 and "is not the dataset the store was built from" in out
    code, out = _doctor(good_store, capsys, "--model", models[0])
    assert code == 1 and "1 model directories given, the store was built from 2" in out
    # another setting: refused when a store is reopened for other settings (message names the setting)
    from dataclasses import replace

    from attribution.features import store_spec

    spec = store_spec(load(tiny_model_dirs), ArrayDataset(tiny_dataset.array, name="tiny"), replace(CFG, num_draws=2))
    with pytest.raises(StoreError, match="setting 'num_draws' differs.*Use another --store directory"):
        Store.open(good_store, spec)


def load(dirs):
    from attribution.models import load_models

    return load_models(dirs)


def test_store_without_checksums_is_a_warning_until_recorded(store_copy, capsys):
    m = json.loads((store_copy / "manifest.json").read_text())
    for k in range(2):
        del m["arrays"][f"rowcrc_{k}.npy"]
        (store_copy / f"rowcrc_{k}.npy").unlink()
    (store_copy / "manifest.json").write_text(json.dumps(m))
    code, out = _doctor(store_copy, capsys)
    assert code == 0 and "records no row checksums" in out and "--record-checksums" in out
    code, out = _doctor(store_copy, capsys, "--record-checksums")
    assert code == 0 and "no row checksums" not in out
    assert Store.open(store_copy).has_checksums
    _edit_bytes(store_copy / "features_0.npy", 4, b"\x01\x02\x03\x04")
    assert not healthy(run_doctor(store_copy))
