"""Helpers shared by the benchmark scripts: machine info, memory, timing, subprocesses, models.

Benchmarks are scripts, not tests (see docs/design.md): each prints a table and
writes JSON under ``benchmarks/results/``. Methods whose peak memory we report run
in their own subprocess (``run_worker``) so that one method's peak cannot hide
another's.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # this checkout's attribution package, not an installed copy
    sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"
RESULT_MARK = "@@RESULT@@"


# ---------------------------------------------------------------------- machine
def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, thread settings, library versions and load average."""
    import numpy
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "cuda": torch.cuda.is_available(),
        "loadavg_at_start": os.getloadavg(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda_version"] = torch.version.cuda
    try:
        import fast_jl  # noqa: F401 - traker's CUDA projector, when built

        info["fast_jl"] = True
    except ImportError:
        info["fast_jl"] = False
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    try:
        from importlib.metadata import version

        info["traker"] = version("traker")
    except Exception:  # noqa: BLE001 - traker is optional for the streaming benchmark
        info["traker"] = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            info["mem_total_gb"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    return info


def other_cpu_users() -> list[str]:
    """Command lines of other busy processes (training runs etc.) that skew timings."""
    try:
        out = subprocess.run(["ps", "-eo", "pcpu,args", "--sort=-pcpu"], capture_output=True, text=True).stdout
    except OSError:
        return []
    busy = []
    for line in out.splitlines()[1:8]:
        pcpu, _, args = line.strip().partition(" ")
        try:
            if float(pcpu) >= 20 and str(os.getpid()) not in args:
                busy.append(f"{pcpu}% {args[:120]}")
        except ValueError:
            continue
    return busy


# ---------------------------------------------------------------------- memory / time
def sync_gpu() -> None:
    """Wait for queued GPU kernels, so that a wall-clock reading taken next is honest (no-op without CUDA)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def timed(store: dict[str, float], key: str) -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    store[key] = store.get(key, 0.0) + time.perf_counter() - t0


# ---------------------------------------------------------------------- workers
def emit_result(result: dict[str, Any]) -> None:
    """Print a worker's result as one marked JSON line (read back by :func:`run_worker`)."""
    result.setdefault("peak_rss_bytes", peak_rss_bytes())
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        result.setdefault("peak_gpu_bytes", torch.cuda.max_memory_allocated())
    print(RESULT_MARK + json.dumps(result), flush=True)


def cpu_busy_s() -> float:
    """CPU seconds spent busy by the whole machine since boot (all cores, /proc/stat)."""
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return (sum(vals[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_worker(script: Path, spec: dict[str, Any], timeout: float = 3600) -> dict[str, Any]:
    """Run ``python script --worker JSON`` in a fresh process and return its result dict.

    Adds ``process_wall_s`` and ``others_busy_cores``: the average number of cores other
    processes kept busy meanwhile (machine busy time minus the worker's CPU time, / wall).
    """
    cmd = [sys.executable, str(script), "--worker", json.dumps(spec)]
    busy0, child0 = cpu_busy_s(), children_cpu_s()
    t0 = time.perf_counter()
    # This checkout's attribution package, not whichever copy is installed in the environment.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
    wall = time.perf_counter() - t0
    others = ((cpu_busy_s() - busy0) - (children_cpu_s() - child0)) / wall
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith(RESULT_MARK):
            out = json.loads(line[len(RESULT_MARK) :])
            out["process_wall_s"] = wall
            out["others_busy_cores"] = round(max(0.0, others), 2)
            return out
    raise RuntimeError(
        f"worker {spec.get('kind')} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )


# ---------------------------------------------------------------------- models / data
def save_random_pipeline(
    directory: Path,
    image_shape: tuple[int, int, int],
    block_out_channels: tuple[int, ...],
    layers_per_block: int,
    seed: int = 0,
    prediction: str = "epsilon",
    shift: float = 1.0,
) -> Path:
    """A random-weight UNet2DModel (the project's make_unet) + its training scheduler in DDPMPipeline layout
    (``prediction``: the objective, :func:`attribution.models.make_training_scheduler`)."""
    import torch

    from attribution.config import TrainConfig
    from attribution.models import make_training_scheduler, make_unet

    if (directory / "model_index.json").exists():
        return directory
    torch.manual_seed(seed)
    unet = make_unet(image_shape, TrainConfig(block_out_channels=block_out_channels, layers_per_block=layers_per_block))
    unet.save_pretrained(directory / "unet", safe_serialization=True)
    sched = make_training_scheduler(prediction, 1000, shift)
    sched.save_pretrained(directory / "scheduler")
    (directory / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "DDPMPipeline",
                "_diffusers_version": "0.42.1",
                "unet": ["diffusers", "UNet2DModel"],
                "scheduler": ["diffusers", type(sched).__name__],
            }
        )
    )
    return directory


def make_dataset(kind: str, n: int):
    """``"digits"``: the first n bundled digits (1x32x32); ``"random3"``: n random 3x32x32 images."""
    import numpy as np

    from attribution.data import ArrayDataset, digits_dataset

    if kind == "digits":
        ds = digits_dataset("train")
        if n > len(ds):
            raise ValueError(f"only {len(ds)} bundled digits, asked for {n}")
        return ArrayDataset(ds.array[:n].copy(), labels=ds.labels[:n].copy(), name=f"digits:train[:{n}]")
    if kind == "random3":
        rng = np.random.default_rng(0)
        return ArrayDataset(rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8), name=f"random3x32x32[{n}]")
    raise ValueError(f"unknown dataset kind {kind!r}")


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def print_table(rows: list[list[str]], header: list[str]) -> str:
    """Render a GitHub-markdown table, print it and return it."""
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    lines = [
        "| " + " | ".join(str(h).ljust(w) for h, w in zip(header, widths)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    for r in rows:
        lines.append("| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |")
    text = "\n".join(lines)
    print(text)
    return text


def wait_for_quiet(max_busy_cores: float = 0.3, window_s: float = 10.0, max_wait_s: float = 0.0, log=print) -> float:
    """Wait until other processes keep fewer than ``max_busy_cores`` busy over ``window_s``
    (at most ``max_wait_s``; 0: do not wait). Returns the last measured busy cores."""
    t_end = time.monotonic() + max_wait_s
    while True:
        b0 = cpu_busy_s()
        time.sleep(window_s)
        busy = (cpu_busy_s() - b0) / window_s
        if busy < max_busy_cores or time.monotonic() >= t_end:
            return busy
        log(f"machine busy ({busy:.2f} cores used by others), waiting ...")
