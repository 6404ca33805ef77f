"""Interrupted jobs: ``attribution featurize`` and ``attribution train`` killed with SIGKILL at random
points, several times in a row, then rerun, end exactly where an uninterrupted run ends; a full disk
or a refused write leaves the previous state intact and the rerun completes."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
KILLS = 4  # per command
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


# One process imports the CLI (torch, diffusers: ~5 s of CPU each time) and forks a child per command;
# the child runs ``attribution.cli.main`` and is what gets killed. Nothing has run torch in the server
# before a fork, so no thread pool is forked half-way.
SERVER = r"""
import json, os, sys
import attribution.cli, attribution.features.featurize, attribution.models.training, attribution.models, attribution.tools.doctor
for line in sys.stdin:
    args, log = json.loads(line)
    pid = os.fork()
    if pid == 0:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1); os.dup2(fd, 2)
        os._exit(attribution.cli.main(args))
    print(pid, flush=True)
    _, status = os.waitpid(pid, 0)
    print(os.waitstatus_to_exitcode(status), flush=True)
"""


class Job:
    """A running ``attribution`` command (a child of the server)."""

    def __init__(self, server: subprocess.Popen, args: list[str], log: Path):
        self.server, self.log = server, log
        server.stdin.write(json.dumps([args, str(log)]) + "\n")
        server.stdin.flush()
        self.pid = int(server.stdout.readline())
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.returncode

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)

    def wait(self) -> int:
        if self.returncode is None:
            self.returncode = int(self.server.stdout.readline())
        return self.returncode


@pytest.fixture(scope="module")
def server():
    proc = subprocess.Popen([sys.executable, "-c", SERVER], cwd=REPO, env=ENV, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    yield proc
    proc.stdin.close()
    proc.wait(timeout=60)


def finish(job: Job) -> None:
    assert job.wait() == 0, job.log.read_text()[-2000:]


def kill_when(job: Job, ready, timeout: float = 120) -> str:
    """SIGKILL the job as soon as ``ready()`` is true (polled every 2 ms); returns what happened."""
    deadline = time.time() + timeout
    alive = lambda: Path(f"/proc/{job.pid}").exists() and "Z" not in _state(job.pid)  # noqa: E731
    while alive() and time.time() < deadline:
        try:
            if ready():
                job.kill()
                code = job.wait()
                return "killed" if code == -signal.SIGKILL else f"finished first (exit {code})"
        except (OSError, ValueError, KeyError, json.JSONDecodeError):
            pass  # a file being replaced as we look
        time.sleep(0.002)
    return f"finished first (exit {job.wait()})"


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def kill_targets(total: int) -> list[int]:
    """KILLS increasing points of progress: KILLS - 1 random ones in [1, total), then ``total``."""
    return sorted(random.sample(range(1, total), KILLS - 1)) + [total]


def _done_rows(store: Path) -> int:
    return sum(int(np.load(p, mmap_mode="r").sum()) for p in store.glob("done_*.npy"))


@pytest.fixture(scope="module")
def data_npz(tiny_dataset, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("interrupt") / "data.npz"
    images = np.concatenate([tiny_dataset.array] * 3)  # 72 rows: room for kills between flushes
    np.savez(path, images=images, labels=np.arange(len(images)) % 3)
    return path


def _runner(server, tmp_path: Path):
    logs = iter(range(1000))
    return lambda *args: Job(server, list(args), tmp_path / f"job{next(logs)}.log")


def test_featurize_killed_repeatedly_equals_uninterrupted(server, tiny_model_dirs, data_npz, tmp_path):
    cli = _runner(server, tmp_path)
    models = [a for d in tiny_model_dirs for a in ("--model", str(d))]
    common = [*models, "--data", str(data_npz), "--proj-dim", "16", "--num-draws", "2", "--batch-size", "4",
              "--device", "cpu"]
    finish(cli("featurize", *common, "--store", str(tmp_path / "reference")))
    store = tmp_path / "store"
    total = 2 * 72
    # kill once the store has (at least) a random number of done rows; the last kill lands at or
    # after the last row, i.e. during finalize (kernels, manifest)
    targets = kill_targets(total)
    outcomes = []
    for target in targets:
        job = cli("featurize", *common, "--store", str(store))
        outcomes.append((target, kill_when(job, lambda: (store / "manifest.json").exists() and _done_rows(store) >= target)))
        outcomes[-1] += (_done_rows(store) if (store / "manifest.json").exists() else 0,)
    finish(cli("featurize", *common, "--store", str(store)))
    print("featurize kills (target rows, outcome, rows done after):", outcomes)
    assert sum(o[1] == "killed" for o in outcomes) >= KILLS - 1
    for name in ("features_0.npy", "features_1.npy", "done_0.npy", "rowcrc_1.npy", "kernel_0.npy", "kernel_1.npy"):
        assert (store / name).read_bytes() == (tmp_path / "reference" / name).read_bytes(), name
    assert not list(store.glob(".*tmp*"))
    finish(cli("doctor", "--store", str(store)))


def _epoch(partial: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(partial / "state.safetensors"), "pt") as f:
        return int(f.metadata()["epoch"])


def test_train_killed_repeatedly_equals_uninterrupted(server, data_npz, tmp_path):
    cli = _runner(server, tmp_path)
    epochs = 8
    common = ["--data", str(data_npz), "--epochs", str(epochs), "--batch-size", "24", "--seed", "3"]
    finish(cli("train", *common, "--out", str(tmp_path / "reference")))
    out = tmp_path / "model"
    partial = tmp_path / "model.partial"
    rng = random.Random()
    outcomes = []
    for target in kill_targets(epochs):
        extra = rng.uniform(0, 0.05)  # land inside the next epoch, or inside the final save

        def ready() -> bool:
            if not (partial / "state.safetensors").exists() or _epoch(partial) < target:
                return False
            time.sleep(extra)
            return True

        outcomes.append((target, kill_when(cli("train", *common, "--out", str(out)), ready)))
    finish(cli("train", *common, "--out", str(out)))
    print("train kills (target epoch, outcome):", outcomes)
    assert sum(o[1] == "killed" for o in outcomes) >= KILLS - 1
    got = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    want = load_file(str(tmp_path / "reference" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert not partial.exists() and not list(tmp_path.glob("model.tmp*"))


# ---------------------------------------------------------------------------- disk full, refused writes
def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_during_featurize_keeps_finished_rows(tiny_models, tiny_dataset, tmp_path, monkeypatch):
    from attribution.config import FeaturizeConfig
    from attribution.features import Store, featurize

    cfg = FeaturizeConfig(proj_dim=16, num_draws=1)
    reference = featurize(tiny_models, tiny_dataset, tmp_path / "reference", cfg, batch_size=4)
    root = tmp_path / "store"
    flushes = {"n": 0}
    real_flush = np.memmap.flush

    def flush_until_full(self):
        if Path(self.filename or "").name.startswith("features_"):
            flushes["n"] += 1
            if flushes["n"] == 3:  # the third batch's rows cannot be written out
                _enospc()
        return real_flush(self)

    monkeypatch.setattr(np.memmap, "flush", flush_until_full)
    with pytest.raises(OSError, match="No space left"):
        featurize(tiny_models, tiny_dataset, root, cfg, batch_size=4)
    monkeypatch.setattr(np.memmap, "flush", real_flush)
    partial = Store.open(root)
    assert int(np.asarray(partial.done(0)).sum()) == 8  # two batches of 4 finished, the third not marked
    # a full disk while writing the kernels: no kernel, no temporary file, the manifest as before
    monkeypatch.setattr("attribution.features.store.np.save", _enospc)
    manifest = (root / "manifest.json").read_bytes()
    with pytest.raises(OSError, match="No space left"):
        featurize(tiny_models, tiny_dataset, root, cfg, batch_size=4)
    assert (root / "manifest.json").read_bytes() == manifest
    assert not list(root.glob("kernel_*")) and not list(root.glob(".*tmp*"))
    monkeypatch.undo()
    store = featurize(tiny_models, tiny_dataset, root, cfg, batch_size=4)
    for m in range(2):
        assert np.asarray(store.features(m)).tobytes() == np.asarray(reference.features(m)).tobytes()
        np.testing.assert_array_equal(store.kernel(m), reference.kernel(m))


def test_refused_writes_leave_the_previous_state(tiny_dataset, tmp_path, monkeypatch):
    """A full disk while saving the epoch state, then a permission error at the final rename:
    the last saved state survives each time and the rerun ends where an uninterrupted run does."""
    from attribution.config import TrainConfig
    from attribution.data import uint8_to_model
    from attribution.models import training

    images = uint8_to_model(tiny_dataset.array[:16])
    cfg = TrainConfig(epochs=3, batch_size=8, block_out_channels=(4, 8), num_train_timesteps=50)
    reference = training.train_ddpm(images, tmp_path / "reference", cfg)
    out = tmp_path / "model"
    real_save = training.save_file
    saves = {"n": 0}

    def save_then_fail(tensors, path, metadata=None):
        saves["n"] += 1
        if saves["n"] == 2:
            Path(path).write_bytes(b"partial write")  # what a full disk leaves half-way
            _enospc()
        return real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(training, "save_file", save_then_fail)
    with pytest.raises(OSError, match="No space left"):
        training.train_ddpm(images, out, cfg)
    partial = tmp_path / "model.partial"
    assert _epoch(partial) == 1 and sorted(p.name for p in partial.iterdir()) == ["state.safetensors", "train_config.json"]

    def refuse(src, dst):
        raise PermissionError(errno.EACCES, "Permission denied", str(dst))

    monkeypatch.setattr(training, "save_file", real_save)
    monkeypatch.setattr(training.os, "replace", lambda s, d: refuse(s, d) if Path(d) == out else os.rename(s, d))
    with pytest.raises(PermissionError):
        training.train_ddpm(images, out, cfg)
    assert not out.exists() and _epoch(partial) == 3 and not list(tmp_path.glob("model.tmp*"))
    monkeypatch.undo()
    training.train_ddpm(images, out, cfg)
    got = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    want = load_file(str(reference / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(FileExistsError, match="other settings"):
        training.train_ddpm(images, out, TrainConfig(epochs=4, batch_size=8, block_out_channels=(4, 8)))


def test_unwritable_store_directory_is_a_one_line_error(tiny_model_dirs, data_npz, capsys):
    """Even root cannot create a directory under /proc: the CLI says so on one line."""
    from attribution.cli import main

    code = main(["featurize", "--model", str(tiny_model_dirs[0]), "--data", str(data_npz),
                 "--store", "/proc/attribution-store", "--proj-dim", "8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and "/proc/attribution-store" in err[0]
