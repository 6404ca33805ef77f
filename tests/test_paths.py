"""Inputs from the app cannot read or write outside the configured directories, nor inject markup."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from attribution.tools import PathEscapeError, resolve_within, safe_name


def test_resolve_within(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (tmp_path / "rootless").mkdir()
    (root / "link").symlink_to(tmp_path / "rootless")
    assert resolve_within(root / "sub" / "new-store", [root]) == (root / "sub" / "new-store").resolve()
    for bad in (root / ".." / "rootless", Path("/etc/passwd"), root / "link" / "store", tmp_path / "rootless",
                root / "sub" / ".." / ".." / "root2"):
        with pytest.raises(PathEscapeError, match="outside the configured directories"):
            resolve_within(bad, [root])


@pytest.mark.parametrize(
    "name, want",
    [
        ("seven.png", "seven.png"),
        ("../../../etc/passwd", "passwd"),
        ("C:\\Users\\me\\evil.png", "evil.png"),
        ("![x](http:tracker.example p.png).png", "__x_(http_tracker.example p.png).png"),
        ("![x](http://tracker.example/p.png).png", "p.png).png"),
        ("<img src=x onerror=alert(1)>.png", "_img src_x onerror_alert(1)_.png"),
        ("a\nb\x00c.png", "a_b_c.png"),
        ("..", "upload"),
        ("", "upload"),
    ],
)
def test_safe_name(name, want):
    assert safe_name(name) == want


def test_safe_name_is_bounded():
    name = safe_name("x" * 500 + ".png")
    assert len(name) <= 80 and name.endswith(".png")


def test_store_build_outside_the_roots_is_refused(tiny_models, tiny_model_dirs, tiny_dataset, tmp_path):
    """A store location that a link (or a ``..``) takes outside the bundle's directories is refused, nothing written."""
    from attribution.config import FeaturizeConfig
    from attribution.features import featurize
    from attribution.workspace import Bundle, Workspace

    root, outside = tmp_path / "bundle", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    np.savez(root / "data.npz", images=tiny_dataset.array)
    featurize(tiny_models, tiny_dataset, root / "store", FeaturizeConfig(proj_dim=8, num_draws=1))
    (root / "store-square").symlink_to(outside)
    bundle = Bundle(name="t", model_dirs=tuple(tiny_model_dirs), data=str(root / "data.npz"),
                    stores={"loss": root / "store", "square": root / "store-square", "l1": root / ".." / "outside"},
                    classifier_dir=None, featurize=FeaturizeConfig(proj_dim=8, num_draws=1), roots=(root,))
    ws = Workspace(bundle)
    for output in ("square", "l1"):
        with pytest.raises(PathEscapeError):
            ws.build_store(output)
    assert list(outside.iterdir()) == []
    with pytest.raises(PathEscapeError):
        ws.start_build("square")
    assert list(outside.iterdir()) == []


def test_app_bundles_are_confined(tmp_path):
    import ui
    from attribution.workspace import ASSETS_DIR, CACHE_DIR, default_bundle

    assert default_bundle().roots == (ASSETS_DIR, CACHE_DIR)
    for o, path in default_bundle().stores.items():
        resolve_within(path, default_bundle().roots)
    (tmp_path / "m0").mkdir()
    (tmp_path / "m0" / "model_index.json").write_text("{}")
    assert ui.bundle_from_dir(tmp_path).roots == (tmp_path, CACHE_DIR)


# ---------------------------------------------------------------------------- the page
from test_app import REPO, app_bundle, make_app, quiet_prefetch, texts, ws  # noqa: E402,F401  (fixtures)
from test_uploads import ODD, _tree  # noqa: E402


def test_upload_names_cannot_inject_or_escape(app_bundle, ws, tmp_path):
    """File names with directories, markdown or HTML: shown sanitized, nothing written anywhere."""
    from attribution.workspace import ASSETS_DIR, CACHE_DIR

    evil = "../../../../tmp/x/![t](http:tracker.example)<b>.png"
    watched = [ASSETS_DIR, CACHE_DIR, REPO / "attribution", REPO / "views"] + ([Path(app_bundle)] if app_bundle else [])
    at = make_app()
    before = _tree(*watched)
    at.file_uploader[0].set_value((evil, b"not an image", "image/png")).run()
    assert not at.exception and at.error[0].value.startswith("Could not use __t_(http_tracker.example)_b_.png:")
    at.file_uploader[0].set_value((evil, ODD["alpha"], "image/png")).run()
    assert not at.exception and not at.error
    assert at.session_state["sample"]["name"] == "__t_(http_tracker.example)_b_.png"
    page = texts(at)
    assert "![t](" not in page and "<b>.png" not in page and "tmp/x" not in page
    assert "upload __t_(http_tracker.example)_b_.png" in page  # under the final sample
    assert _tree(*watched) == before and not Path("/tmp/x").exists()
