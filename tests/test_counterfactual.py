"""Counterfactual jobs (attribution/counterfactual): resume after a kill, the cache, cancellation, the queue, the CLI."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from cf_bundle import NUM_TRAIN, build_cf_bundle, cf_bundle

from attribution.counterfactual import (
    CounterfactualRequest,
    find_result,
    interrupted,
    parse_rule,
    removed_set,
    run as cf_run,
)

STEPS = 6  # sampling steps of the test samples


@pytest.fixture(scope="module")
def bundle_root(tmp_path_factory) -> Path:
    return build_cf_bundle(tmp_path_factory.mktemp("cf") / "bundle")


@pytest.fixture(scope="module")
def ws(bundle_root):
    from attribution.config import QueryConfig
    from attribution.workspace import Workspace

    w = Workspace(cf_bundle(bundle_root), device="cpu", query=QueryConfig(num_resamples=2))
    w.counterfactual_shipped = ()
    yield w
    w.shutdown()


@pytest.fixture
def cache(ws, tmp_path):
    ws.counterfactual_cache = tmp_path / "cache"
    return ws.counterfactual_cache


def sample(ws, seed: int = 1):
    from attribution.workspace import SampleRecipe

    return ws.sample(replace(SampleRecipe.generated(seed), num_steps=STEPS))


def request(ws, rule: str = "top", k: int = 5, seed: int = 1, step: int = 3) -> CounterfactualRequest:
    key, _ = sample(ws, seed)
    return ws.counterfactual_request(key, step, rule, k)


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def test_rules_and_key(ws):
    scores = np.array([0.5, -2.0, 3.0, 0.0, -1.0])
    assert removed_set("top", 2, scores).tolist() == [0, 2]
    assert removed_set("bottom", 2, scores).tolist() == [1, 4]
    r = removed_set("random", 2, scores, random_seed=3)
    assert r.tolist() == removed_set("random", 2, -scores, random_seed=3).tolist()  # independent of the sample
    assert removed_set("class:1", 0, scores, labels=np.array([0, 1, 1, 0, 2])).tolist() == [1, 2]
    for bad in ("best", "class:", "class:x", "top:3"):
        with pytest.raises(ValueError, match="--remove|class"):
            parse_rule(bad)
    with pytest.raises(ValueError, match="k must be"):
        removed_set("top", 5, scores)
    a, b = request(ws, "top"), request(ws, "random")
    assert a.key() != b.key() and a.key() == CounterfactualRequest.from_dict(a.to_dict()).key()
    assert np.isclose(a.predicted_delta_f, ws.scores(a.sample, "journey", [3])[0][list(a.removed)].sum())
    # the random set (and so its retraining) is shared by every sample; the result is not
    c = request(ws, "random", seed=2)
    assert c.train_key() == b.train_key() and c.key() != b.key()


def test_killed_run_resumes_to_the_same_result(ws, tmp_path, monkeypatch):
    req = request(ws)
    ws.counterfactual_cache = tmp_path / "whole"
    whole = ws.run_counterfactual(req)
    assert not (tmp_path / "whole" / "work" / req.train_key()).exists()  # weights deleted once the result is written
    m = whole.meta["metrics"]
    assert m["pixel_l2"] > 0 and set(m) >= {"class_changed", "probs_new", "measured_delta_f", "predicted_delta_f"}
    assert len(m["probs_original"]) == 10 and abs(sum(m["probs_new"]) - 1) < 1e-5

    class Killed(Exception):
        pass

    steps_per_epoch = -(-NUM_TRAIN // 16)

    def kill_in_epoch_2(done: int, total: int) -> None:
        if done == steps_per_epoch + 1:
            raise Killed

    ws.counterfactual_cache = tmp_path / "killed"
    with pytest.raises(Killed):
        ws.run_counterfactual(req, progress=kill_in_epoch_2)
    assert find_result(tmp_path / "killed", req) is None
    assert interrupted(tmp_path / "killed", req) == 1
    resumed = ws.run_counterfactual(req)
    assert resumed.meta["metrics"] == whole.meta["metrics"]
    for name in whole.images:
        assert (resumed.path / f"{name}.png").read_bytes() == (whole.path / f"{name}.png").read_bytes()
    assert interrupted(tmp_path / "killed", req) is None


def test_second_request_hits_the_cache(ws, cache, monkeypatch):
    req = request(ws, "bottom")
    first = ws.run_counterfactual(req)

    def no_training(*a, **k):
        raise AssertionError("retrained although the result is cached")

    monkeypatch.setattr(cf_run, "train_ddpm", no_training)
    t0 = time.perf_counter()
    again = ws.run_counterfactual(ws.counterfactual_request(req.sample, req.step, "bottom", 5))
    assert time.perf_counter() - t0 < 1.0
    assert again.path == first.path and again.meta == first.meta


def test_cancelled_job_leaves_nothing(ws, cache):
    req = request(ws, "top", k=7)
    req = replace(req, train=replace(req.train, epochs=400))  # long enough to be cancelled mid-run
    job = ws.start_counterfactual(req)
    deadline = time.time() + 60
    while job.done < 4 and time.time() < deadline:
        time.sleep(0.02)
    assert job.running and job.stage == "training"
    ws.cancel_counterfactual(req)
    assert not job.running and job.error is None
    assert listing(cache) in ([], ["work"]), listing(cache)
    assert ws.counterfactual_result(req) is None and ws.counterfactual_interrupted(req) is None


def test_two_jobs_at_once_the_third_waits(ws, cache):
    reqs = [replace(r, train=replace(r.train, epochs=400)) for r in (request(ws, "top", k) for k in (4, 6, 8))]
    jobs = [ws.start_counterfactual(r) for r in reqs]
    try:
        deadline = time.time() + 60
        while sum(j.stage == "training" for j in jobs) < 2 and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)
        assert sorted(j.stage for j in jobs) == ["queued", "training", "training"]
        assert len(ws.counterfactual_jobs()) == 3
    finally:
        for r in reqs:
            ws.cancel_counterfactual(r)
    assert listing(cache) in ([], ["work"])


def test_cli_counterfactual(bundle_root, tmp_path, capsys):
    from attribution.cli import main
    from attribution.workspace import ASSETS_DIR

    argv = ["counterfactual", "--store", str(bundle_root / "store"), "--data", str(bundle_root / "data.npz"),
            "--classifier", str(ASSETS_DIR / "classifier"), "--seed", "1", "--num-steps", str(STEPS), "--step", "3",
            "--remove", "random", "--k", "5", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "random-5 of seed1-ddim6 at step 3: pixel l2" in out and "from cache" not in out
    meta = json.loads((tmp_path / "out" / "result.json").read_text())
    assert meta["request"]["remove"] == "random" and len(meta["request"]["removed"]) == 5
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {"original.png", "sample.png", "sample_x0.png"}
    assert main(argv) == 0
    assert "from cache" in capsys.readouterr().out
    assert main([*argv[:-6], "--remove", "best", *argv[-4:]]) == 2
    assert "--remove must be top, bottom, random or class:C" in capsys.readouterr().err
