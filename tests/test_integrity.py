"""Issue 25: an edited or swapped manifest is refused (naming the setting), ``doctor`` recomputes rows,
a second featurize of a locked store is refused at once, and bad CLI input gets a one-line message
before any model is loaded."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from attribution.cli import build_parser, main
from attribution.config import FeaturizeConfig, QueryConfig
from attribution.data import ArrayDataset
from attribution.data.datasets import load_dataset
from attribution.features import Store, StoreError, featurize
from attribution.features.store import BINDING_FILE, LOCK_FILE, StoreBusyError, store_lock
from attribution.features.verify import check_rows, likely_cause, mismatch_message
from attribution.scoring.baselines import SimilarityBaseline
from attribution.scoring.masks import mask_from_file
from attribution.scoring.scorer import top_k
from attribution.tools.doctor import healthy, run_doctor

CFG = FeaturizeConfig(proj_dim=16, num_draws=2, store_dtype="float16")


@pytest.fixture(scope="module")
def data_npz(tiny_dataset, tmp_path_factory) -> Path:
    """The tiny dataset as an .npz, so that the store records a loadable dataset spec."""
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    np.savez(path, images=tiny_dataset.array, labels=tiny_dataset.labels)
    return path


@pytest.fixture(scope="module")
def npz_dataset(data_npz, tiny_models) -> ArrayDataset:
    return load_dataset(str(data_npz), tiny_models[0].pixel_shape)


@pytest.fixture(scope="module")
def bound_store(tiny_models, npz_dataset, tmp_path_factory) -> Path:
    """A store with the settings binding; its checkpoint paths are relative, so copies next to it keep working."""
    root = tmp_path_factory.mktemp("integrity") / "bound"
    featurize(tiny_models, npz_dataset, root, CFG)
    return root


@pytest.fixture
def copy_of(bound_store, tmp_path_factory):
    def make(name: str, legacy: bool = False) -> Path:
        dst = Path(shutil.copytree(bound_store, bound_store.parent / f"{name}-{time.monotonic_ns()}"))
        if legacy:  # as the shipped store: no binding file, no hash in the manifest
            (dst / BINDING_FILE).unlink()
            _edit_manifest(dst, lambda m: m.pop("settings_sha256"))
        return dst

    return make


def _edit_manifest(root: Path, edit) -> None:
    path = root / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest, indent=2))


def _set(key: str, value):
    return lambda m: m["settings"].__setitem__(key, value)


EDITS = [("proj_seed", 1), ("sjlt_nnz", 2), ("proj_kind", "gaussian"), ("num_draws", 1), ("output", "square")]


# ---------------------------------------------------------------------- 1. edited or swapped manifests
def test_bound_store_opens_and_records_its_hash(bound_store):
    store = Store.open(bound_store)
    binding = json.loads((bound_store / BINDING_FILE).read_text())
    assert binding["sha256"] == store.manifest["settings_sha256"]
    assert binding["settings"]["settings.proj_seed"] == CFG.proj_seed


@pytest.mark.parametrize("key,value", EDITS)
def test_edited_setting_is_refused_naming_it(copy_of, key, value):
    root = copy_of("edited")
    _edit_manifest(root, _set(key, value))
    with pytest.raises(StoreError, match=rf"settings\.{key} = {value!r} but the features were built with"):
        Store.open(root)


def test_manifest_swapped_from_another_store_is_refused(copy_of, tiny_models, npz_dataset, tmp_path):
    other = tmp_path / "other"
    featurize(tiny_models, npz_dataset, other, FeaturizeConfig(proj_dim=16, num_draws=2, proj_seed=5))
    root = copy_of("swapped")
    shutil.copy(other / "manifest.json", root / "manifest.json")
    with pytest.raises(StoreError, match=r"settings\.proj_seed = 5 but the features were built with 0"):
        Store.open(root)


def test_edited_hash_or_binding_is_refused(copy_of):
    root = copy_of("hash")
    _edit_manifest(root, lambda m: m.__setitem__("settings_sha256", "0" * 64))
    with pytest.raises(StoreError, match="settings hash"):
        Store.open(root)
    root = copy_of("nobinding")
    (root / BINDING_FILE).unlink()
    with pytest.raises(StoreError, match=f"lacks {BINDING_FILE}"):
        Store.open(root)


def test_legacy_store_opens_and_recomputed_rows_match(copy_of, tiny_models, npz_dataset):
    store = Store.open(copy_of("legacy", legacy=True))
    checks = check_rows(store, tiny_models, npz_dataset, rows_per_checkpoint=3, seed=0)
    assert len(checks) == 6 and all(c.ok for c in checks)
    assert max(c.rel_error for c in checks) < 5e-3  # float16 rounding only
    assert mismatch_message(store, checks) is None


@pytest.mark.parametrize("key,value", EDITS)
def test_doctor_recomputes_rows_and_names_the_edited_setting(copy_of, data_npz, key, value, capsys):
    """A legacy store (no binding) with an edited setting: only recomputing rows can tell."""
    root = copy_of("doctor", legacy=True)
    _edit_manifest(root, _set(key, value))
    Store.open(root)  # nothing cheap notices
    code = main(["doctor", "--store", str(root), "--data", str(data_npz)])
    out = capsys.readouterr().out
    assert code == 1, out
    assert "recomputed row(s) differ from the stored ones" in out
    assert f"the rows match {key} = {getattr(CFG.resolved(), key)!r}" in out


def test_doctor_reports_recomputed_rows_of_a_healthy_store(copy_of, data_npz, capsys):
    root = copy_of("healthy", legacy=True)
    code = main(["doctor", "--store", str(root), "--data", str(data_npz), "-v"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "6 row(s) recomputed from the models match the stored ones" in out  # 3 per checkpoint


def test_doctor_without_loadable_data_warns_that_rows_were_not_recomputed(copy_of, tiny_model_dirs):
    root = copy_of("nodata", legacy=True)
    _edit_manifest(root, lambda m: m["dataset"].__setitem__("name", "nowhere"))
    findings = run_doctor(root)
    assert healthy(findings)
    assert any(f.level == "warning" and "rows not recomputed" in f.what for f in findings)


def test_likely_cause_is_none_for_an_unexplained_mismatch(copy_of, tiny_models, npz_dataset):
    root = copy_of("two-edits", legacy=True)
    _edit_manifest(root, lambda m: m["settings"].update(proj_seed=3, draw_seed=4))  # two settings at once
    store = Store.open(root)
    checks = check_rows(store, tiny_models, npz_dataset, rows_per_checkpoint=1, seed=0)
    assert not any(c.ok for c in checks)
    assert likely_cause(store, tiny_models, npz_dataset, checks[0]) is None
    assert "not those the rows were built with" in mismatch_message(store, checks)


def test_attribute_refuses_a_legacy_store_whose_rows_do_not_match(copy_of, capsys, tmp_path):
    root = copy_of("attr", legacy=True)
    _edit_manifest(root, _set("proj_seed", 1))
    code = main(["attribute", "--store", str(root), "--seed", "0", "--num-steps", "3", "--num-resamples", "2",
                 "--out", str(tmp_path / "s.npz")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "recomputed row(s) differ" in err and "attribution doctor" in err
    assert not (tmp_path / "s.npz").exists()


# ---------------------------------------------------------------------- 2. the store lock
HOLDER = textwrap.dedent("""
    import sys, time
    from attribution.features.store import store_lock
    with store_lock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(60)
""")


def _hold_lock(root: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(root)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_featurize_is_refused_naming_the_holder(tiny_models, npz_dataset, tmp_path, tiny_model_dirs,
                                                       data_npz, capsys):
    root = tmp_path / "locked"
    proc = _hold_lock(root)
    try:
        with pytest.raises(StoreBusyError, match=rf"is in use by PID {proc.pid} on .* \(.*\)"):
            featurize(tiny_models, npz_dataset, root, CFG)
        argv = ["featurize", "--store", str(root), "--data", str(data_npz), "--proj-dim", "16", "--num-draws", "2"]
        for d in tiny_model_dirs:
            argv += ["--model", str(d)]
        t0 = time.perf_counter()
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"in use by PID {proc.pid}" in err and err.count("\n") == 1
        assert time.perf_counter() - t0 < 1.0  # refused before loading the models
        assert not (root / "manifest.json").exists()
    finally:
        proc.kill()
        proc.wait()
    # the holder was killed (-9): the OS released its lock, so a stale lock file does not block
    assert (root / LOCK_FILE).exists()
    store = featurize(tiny_models, npz_dataset, root, CFG)
    assert store.is_complete() and not (root / LOCK_FILE).exists()


def test_lock_is_reentrant_in_a_thread_and_refused_to_another(tmp_path):
    root = tmp_path / "s"
    errors: list[BaseException] = []

    def other() -> None:
        try:
            with store_lock(root):
                pass
        except StoreBusyError as e:
            errors.append(e)

    with store_lock(root):
        with store_lock(root):  # the CLI holds it, featurize takes it again
            pass
        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert len(errors) == 1 and "another thread" in str(errors[0])
    with store_lock(root):  # released
        pass


def test_lock_holder_is_written_into_the_lock_file(tmp_path):
    with store_lock(tmp_path / "s"):
        info = json.loads((tmp_path / "s" / LOCK_FILE).read_text())
    assert info["pid"] == os.getpid() and info["host"] and info["command"]


# ---------------------------------------------------------------------- 3 + 5. messages, before loading models
@pytest.fixture
def no_model_loading(monkeypatch):
    """Make loading a model fail loudly: errors must come before it."""
    import attribution.models.load as load

    def refuse(*a, **k):
        raise AssertionError("models were loaded before the arguments were checked")

    monkeypatch.setattr(load, "load_models", refuse)


def _attribute(store: Path, out: Path, *extra: str) -> list[str]:
    source = [] if "--image" in extra else ["--seed", "0"]
    return ["attribute", "--store", str(store), *source, "--num-steps", "3", "--num-resamples", "2",
            "--out", str(out), *extra]


def _image(path: Path, w: int, h: int, value: int = 255) -> Path:
    arr = np.zeros((h, w), dtype=np.uint8)
    arr[: max(1, h // 2), : max(1, w // 2)] = value
    Image.fromarray(arr).save(path)
    return path


@pytest.mark.parametrize("extra,message", [
    (["--steps", ""], "--steps '' selects no step"),
    (["--steps", " , "], "selects no step"),
    (["--steps", "7"], "outside [0, 3)"),
    (["--ridge", "nan"], "ridge must be a finite non-negative number, not nan"),
    (["--ridge", "inf"], "ridge must be a finite non-negative number, not inf"),
    (["--top-k", "-5"], "--top-k must be at least 1, not -5"),
    (["--top-k", "0"], "--top-k must be at least 1, not 0"),
    (["--method", "dtrak-square"], "needs a store of --output square"),
    (["--model", "/nonexistent/model"], "model directory /nonexistent/model does not exist"),
    (["--image", "/nonexistent.png"], "is not a file"),
])
def test_bad_flags_get_one_line_before_models_load(bound_store, tmp_path, no_model_loading, capsys, extra, message):
    assert main(_attribute(bound_store, tmp_path / "s.npz", *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_out_directory_or_missing_parent_is_refused(bound_store, tmp_path, no_model_loading, capsys):
    assert main(_attribute(bound_store, tmp_path)) == 2
    assert f"--out {tmp_path} is a directory; name the .npz file" in capsys.readouterr().err
    assert main(_attribute(bound_store, tmp_path / "no" / "s.npz")) == 2
    assert "does not exist" in capsys.readouterr().err


def test_missing_store_is_refused_before_models_load(tmp_path, no_model_loading, capsys):
    assert main(_attribute(tmp_path / "none", tmp_path / "s.npz")) == 2
    assert "no store at" in capsys.readouterr().err


def test_out_without_suffix_names_the_file_written(bound_store, tmp_path, capsys):
    assert main(_attribute(bound_store, tmp_path / "scores", "--steps", "2")) == 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'scores.npz'}:" in out
    assert (tmp_path / "scores.npz").exists() and not (tmp_path / "scores").exists()


@pytest.mark.parametrize("w,h", [(7, 9), (8, 16), (16, 8)])
def test_mask_of_another_aspect_ratio_is_refused(bound_store, tmp_path, no_model_loading, capsys, w, h):
    mask = _image(tmp_path / "m.png", w, h)
    assert main(_attribute(bound_store, tmp_path / "s.npz", "--mask", str(mask))) == 2
    err = capsys.readouterr().err
    assert f"is {w}x{h} pixels but the model's images are 8x8" in err and "aspect ratio" in err


def test_mask_of_another_size_is_box_averaged_with_a_note(bound_store, tmp_path, capsys):
    mask = _image(tmp_path / "m.png", 16, 16)
    assert main(_attribute(bound_store, tmp_path / "s.npz", "--mask", str(mask), "--steps", "2")) == 0
    err = capsys.readouterr().err
    assert "note: mask m.png is 16x16 pixels, the model's images 8x8: it was box-averaged" in err
    values, note = mask_from_file(mask, (8, 8))
    assert values.shape == (8, 8) and values[:4, :4].all() and not values[4:].any() and note


def test_mask_counts_pixels_brighter_than_mid_grey(tmp_path):
    dim, bright = _image(tmp_path / "dim.png", 8, 8, 127), _image(tmp_path / "bright.png", 8, 8, 128)
    with pytest.raises(ValueError, match="selects no pixel: paint the patch brighter than mid-grey"):
        mask_from_file(dim, (8, 8))
    values, note = mask_from_file(bright, (8, 8))
    assert note is None and values.sum() == 16
    (action,) = [a for a in build_parser(bench=False)._subparsers._group_actions[0].choices["attribute"]._actions
                 if "--mask" in a.option_strings]
    assert "brighter than mid-grey" in action.help and "non-black" not in action.help


def test_top_k_and_ridge_are_checked_by_the_library():
    with pytest.raises(ValueError, match="at least 1"):
        top_k(np.zeros((1, 10)), -5)
    with pytest.raises(ValueError, match="finite"):
        QueryConfig(ridge=float("nan"))


# ---------------------------------------------------------------------- 4. baselines from the CLI
@pytest.mark.parametrize("method", ["baseline-pixel", "pixel"])
def test_attribute_runs_the_pixel_baseline(bound_store, tmp_path, npz_dataset, capsys, method):
    out = tmp_path / "b.npz"
    assert main(_attribute(bound_store, out, "--method", method, "--steps", "0,2")) == 0
    with np.load(out) as z:
        scores, x0 = z["scores"], z["x0_hat"]
        assert str(z["method"]) == "baseline-pixel"
    assert scores.shape == (2, len(npz_dataset))
    want = SimilarityBaseline(npz_dataset).scores(__import__("torch").from_numpy(x0).clamp(-1, 1))
    np.testing.assert_allclose(scores, want, atol=1e-6)


def test_attribute_runs_the_embedding_baseline(bound_store, tmp_path, capsys):
    from attribution.models.classifier import CLASSIFIER_DIR

    if not Path(CLASSIFIER_DIR).is_dir():
        pytest.skip("no bundled digit classifier")
    out = tmp_path / "e.npz"
    assert main(_attribute(bound_store, out, "--method", "embedding", "--steps", "1")) == 0
    with np.load(out) as z:
        assert z["scores"].shape == (1, 24) and str(z["method"]) == "baseline-embedding"
        assert np.isfinite(z["scores"]).all() and np.abs(z["scores"]).max() <= 1 + 1e-5


def test_readme_names_the_baselines_the_cli_accepts():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    choices = next(a for a in build_parser(bench=False)._subparsers._group_actions[0].choices["attribute"]._actions
                   if "--method" in a.option_strings).choices
    for name in ("baseline-pixel", "baseline-embedding"):
        assert f"`{name}`" in readme and name in choices


def _featurize_argv(store: Path, model_dirs, data: Path, *extra: str) -> list[str]:
    argv = ["featurize", "--store", str(store), "--data", str(data), "--proj-dim", "16", "--num-draws", "2", "--half"]
    for d in model_dirs:
        argv += ["--model", str(d)]
    return argv + list(extra)


@pytest.mark.parametrize("extra,message", [
    (["--num-draws", "0"], "num_draws, proj_dim and sjlt_nnz must be positive"),
    (["--batch-size", "0"], "--batch-size must be at least 1, not 0"),
    (["--timestep-range", "5", "5"], "timestep_range must be (lo, hi) with 0 <= lo < hi"),
    (["--proj-seed", "3"], "setting 'proj_seed' differs: the store was built with 0, now 3"),
])
def test_featurize_checks_flags_and_the_store_before_models_load(bound_store, tiny_model_dirs, data_npz,
                                                                 no_model_loading, capsys, extra, message):
    assert main(_featurize_argv(bound_store, tiny_model_dirs, data_npz, *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_featurize_refuses_missing_model_dirs_and_data_before_loading(tmp_path, tiny_model_dirs, data_npz,
                                                                      no_model_loading, capsys):
    assert main(_featurize_argv(tmp_path / "s", [tmp_path / "nomodel"], data_npz)) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(_featurize_argv(tmp_path / "s", tiny_model_dirs, tmp_path / "none.npz")) == 2
    assert "is neither 'digits'" in capsys.readouterr().err


def test_doctor_binds_a_verified_legacy_store_and_later_edits_are_refused(copy_of, data_npz, capsys):
    root = copy_of("bind", legacy=True)
    code = main(["doctor", "--store", str(root), "--data", str(data_npz)])
    out = capsys.readouterr().out
    assert code == 0 and "no settings binding" in out and "--bind-settings" in out
    assert main(["doctor", "--store", str(root), "--data", str(data_npz), "--bind-settings"]) == 0
    capsys.readouterr()
    assert Store.open(root).has_binding and (root / BINDING_FILE).exists()
    _edit_manifest(root, _set("proj_seed", 1))
    with pytest.raises(StoreError, match=r"settings\.proj_seed = 1 but the features were built with 0"):
        Store.open(root)


def test_doctor_does_not_bind_a_store_whose_rows_do_not_match(copy_of, data_npz, capsys):
    root = copy_of("nobind", legacy=True)
    _edit_manifest(root, _set("proj_seed", 1))
    assert main(["doctor", "--store", str(root), "--data", str(data_npz), "--bind-settings"]) == 1
    capsys.readouterr()
    assert not (root / BINDING_FILE).exists() and not Store.open(root).has_binding


def test_recomputing_rows_leaves_the_models_as_they_were(bound_store, tiny_models, npz_dataset):
    """The spot check runs featurize's hooked gradients on the scorer's own models: scores are unchanged."""
    from attribution.config import SamplingConfig
    from attribution.features.verify import spot_check
    from attribution.sampling import sample_trajectory
    from attribution.scoring import Scorer

    traj = sample_trajectory(tiny_models[0], SamplingConfig(num_inference_steps=3, seed=0))
    scorer = Scorer(Store.open(bound_store), tiny_models, "journey", QueryConfig(num_resamples=2))
    before = scorer.score(traj, [0, 2]).scores
    spot_check(scorer.store, tiny_models, npz_dataset, scorer.projectors)
    np.testing.assert_array_equal(scorer.score(traj, [0, 2]).scores, before)
