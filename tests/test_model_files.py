"""Model, data and store files are never unpickled: a malicious pickle placed where weights, data or
store arrays are looked for is refused, and the code inside it never runs."""

from __future__ import annotations

import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from attribution.models import ModelLoadError, load_model

REPO = Path(__file__).resolve().parent.parent


class Payload:
    """Unpickling this runs ``exec``, which creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('the pickle ran')",))


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "PWNED"


def test_the_payload_is_live(tmp_path):
    """Control: unpickling the payload without protection does run its code."""
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(Payload(control)))
    assert control.read_text() == "the pickle ran"


def _unet_dir_with_pickle(src: Path, dst: Path, marker: Path, keep_safetensors: bool) -> Path:
    shutil.copytree(src, dst)
    unet = dst / "unet"
    if not keep_safetensors:
        (unet / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({"conv_in.weight": Payload(marker)}, unet / "diffusion_pytorch_model.bin")
    return dst


def test_pickle_weights_are_refused(tiny_model_dirs, tmp_path, marker):
    bad = _unet_dir_with_pickle(tiny_model_dirs[0], tmp_path / "evil", marker, keep_safetensors=False)
    with pytest.raises(ModelLoadError, match="only safetensors weights are loaded"):
        load_model(bad)
    assert not marker.exists()


def test_pickle_beside_safetensors_is_ignored(tiny_model_dirs, tmp_path, marker):
    both = _unet_dir_with_pickle(tiny_model_dirs[0], tmp_path / "both", marker, keep_safetensors=True)
    model = load_model(both)
    assert model.checkpoint_hash == load_model(tiny_model_dirs[0]).checkpoint_hash
    assert not marker.exists()
    from attribution.tools.doctor import check_models

    _, findings = check_models([both])
    assert any(f.level == "warning" and "diffusion_pytorch_model.bin" in f.what for f in findings)


def test_weights_only_torch_load_refuses_the_payload(tmp_path, marker):
    path = tmp_path / "evil.bin"
    torch.save({"w": Payload(marker)}, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    assert not marker.exists()


def test_pickled_data_and_store_arrays_are_refused(tmp_path, marker, tiny_models, tiny_dataset, capsys):
    from attribution.cli import main
    from attribution.config import FeaturizeConfig
    from attribution.data import load_dataset
    from attribution.features import Store, StoreError, featurize

    evil = np.empty(1, dtype=object)
    evil[0] = Payload(marker)
    np.savez(tmp_path / "data.npz", images=evil)  # an object array: stored as a pickle
    with pytest.raises(ValueError, match="allow_pickle"):
        load_dataset(str(tmp_path / "data.npz"))
    code = main(["train", "--data", str(tmp_path / "data.npz"), "--out", str(tmp_path / "m"), "--epochs", "1"])
    assert code == 2 and capsys.readouterr().err.startswith("error:") and not (tmp_path / "m").exists()

    root = tmp_path / "store"
    featurize(tiny_models, tiny_dataset, root, FeaturizeConfig(proj_dim=8, num_draws=1))
    done = root / "features_0.npy"
    size = done.stat().st_size
    np.save(done, evil, allow_pickle=True)
    with open(done, "ab") as f:  # same size as the real file, so only the header check can tell
        f.write(b"\0" * (size - done.stat().st_size))
    with pytest.raises(StoreError, match="features_0.npy holds"):
        Store.open(root)
    assert not marker.exists()


PATTERNS = {
    "torch.load without weights_only=True": re.compile(r"torch\.load\((?![^)]*weights_only=True)"),
    "pickle.load(s)": re.compile(r"\bpickle\.loads?\("),
    "allow_pickle=True": re.compile(r"allow_pickle\s*=\s*True"),
    "use_safetensors=False": re.compile(r"use_safetensors\s*=\s*False"),
}


def test_no_unsafe_loading_in_the_code():
    files = [*(REPO / "attribution").rglob("*.py"), *(REPO / "views").glob("*.py"), REPO / "app.py",
             *(REPO / "ui").glob("*.py"), *(REPO / "benchmarks").rglob("*.py")]
    found = [f"{p.relative_to(REPO)}: {name}" for p in files for name, rx in PATTERNS.items() if rx.search(p.read_text())]
    assert not found, found


def _tiny_with_scheduler(tmp_path, change: dict) -> Path:
    import json

    from conftest import make_tiny_pipeline

    d = make_tiny_pipeline(tmp_path / "m", 0)
    cfg_path = d / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(change)
    cfg_path.write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("change, kind", [
    ({"prediction_type": "v_prediction"}, "v_prediction"),
    ({"prediction_type": "sample"}, "sample"),
    ({"_class_name": "DDIMScheduler", "prediction_type": "v_prediction"}, "v_prediction"),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}, "flow"),
])
def test_implemented_objectives_load_as_themselves(tmp_path, change, kind):
    """A v-prediction, sample-prediction or flow-matching pixel model loads with its own objective
    (it used to be refused, and before that attributed silently as an epsilon model)."""
    model = load_model(_tiny_with_scheduler(tmp_path, change))
    assert model.objective.kind.value == kind
    assert model.objective.identity["kind"] == kind


@pytest.mark.parametrize("change, named", [
    ({"prediction_type": "x0"}, "prediction_type='x0'"),
    ({"_class_name": "FlowMatchHeunDiscreteScheduler"}, "FlowMatchHeunDiscreteScheduler"),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True}, "use_dynamic_shifting"),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler", "use_karras_sigmas": True}, "use_karras_sigmas"),
])
def test_objectives_the_core_does_not_implement_are_refused_by_name(tmp_path, change, named):
    """Any other objective or scheduler would be attributed with the wrong loss: refused, naming it, in one line."""
    with pytest.raises(ModelLoadError, match=re.escape(named)) as info:
        load_model(_tiny_with_scheduler(tmp_path, change))
    assert "\n" not in str(info.value)
