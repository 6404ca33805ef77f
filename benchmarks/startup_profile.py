"""Where a fresh server's first page spends its time: a cProfile of the app's first run, by stage.

Runs the app's first script run (what a new server does for its first browser session, up to
the influencers of the Explore page) in a fresh interpreter under Streamlit's AppTest, with
cProfile enabled in the script thread, and reads the cumulative time of the functions that
make up each stage. ``--runs`` fresh interpreters are profiled one after the other: the first
with the kernel cache emptied (a fresh machine), the others find it filled (a restarted
server). Profiling inflates Python-heavy stages (imports) by about a third; the browser's own
share is measured by ``first_paint.py``. Prints a table and writes JSON::

    python benchmarks/startup_profile.py --runs 2 --json benchmarks/results/startup_profile.json
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: stage -> (file suffix, function name) whose cumulative time is the stage's
STAGES = {
    "imports (ui, attribution, torch, diffusers)": ("ui/__init__.py", "<module>"),
    "workspace load (models, data, classifier)": ("ui/launch.py", "_load_workspace"),
    "sample (50 DDIM steps)": ("attribution/workspace/workspace.py", "generate"),
    "scorer set-up": ("attribution/scoring/scorer.py", "__init__"),
    "  of which kernels": ("attribution/features/store.py", "kernel"),
    "first step's scores": ("attribution/scoring/scorer.py", "score"),
}

WRAPPER = '''
import cProfile, os, time
_profile = cProfile.Profile()
_t0 = time.perf_counter()
_profile.enable()
try:
    exec(compile(open({app!r}).read(), {app!r}, "exec"))
finally:
    _profile.disable()
    _profile.dump_stats(os.environ["STARTUP_PROFILE_OUT"])
    with open(os.environ["STARTUP_PROFILE_OUT"] + ".wall", "w") as f:
        f.write(str(time.perf_counter() - _t0))
'''

RUNNER = '''
import sys
from streamlit.testing.v1 import AppTest
at = AppTest.from_file(sys.argv[1], default_timeout=900)
at.run()
if at.exception:
    raise SystemExit("the app failed: " + at.exception[0].value)
'''


def profile_once(repo: Path, out: Path, env: dict[str, str]) -> tuple[pstats.Stats, float]:
    """Profile one first run of ``repo``'s app in a fresh interpreter: (stats, script seconds)."""
    wrapper = repo / ".startup_profile_app.py"  # beside app.py: the pages' paths are relative to it
    wrapper.write_text(WRAPPER.format(app=str(repo / "app.py")))
    try:
        subprocess.run([sys.executable, "-c", RUNNER, str(wrapper)], cwd=repo, check=True,
                       env={**os.environ, **env, "PYTHONPATH": str(repo), "STARTUP_PROFILE_OUT": str(out)})
    finally:
        wrapper.unlink(missing_ok=True)
    return pstats.Stats(str(out)), float(Path(str(out) + ".wall").read_text())


def stage_seconds(stats: pstats.Stats) -> dict[str, float]:
    """Cumulative seconds of each stage's function (0 when it did not run)."""
    found = {name: 0.0 for name in STAGES}
    for (path, _, func), (_, _, _, cumulative, _) in stats.stats.items():  # type: ignore[attr-defined]
        for name, (suffix, want) in STAGES.items():
            if func == want and path.endswith(suffix):
                found[name] += cumulative
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", type=Path, default=REPO, help="checkout whose app.py is profiled")
    ap.add_argument("--runs", type=int, default=2, help="fresh interpreters: the first with an empty kernel cache")
    ap.add_argument("--json", type=Path, help="also write the result here")
    args = ap.parse_args()
    cache = Path(tempfile.mkdtemp(prefix="startup-cache-"))
    work = Path(tempfile.mkdtemp(prefix="startup-profile-"))
    env = {"ATTRIBUTION_CACHE": str(cache), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    runs = []
    try:
        for r in range(args.runs):
            stats, wall = profile_once(args.repo.resolve(), work / f"run{r}.prof", env)
            runs.append({"script_s": wall, "stages_s": stage_seconds(stats),
                         "kernel_cache": "empty" if r == 0 else "filled"})
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    print(f"first script run of {args.repo} (cProfile; seconds)")
    print(f"{'stage':46s}" + "".join(f"  run {r} ({run['kernel_cache']} cache)" for r, run in enumerate(runs)))
    for name in STAGES:
        print(f"{name:46s}" + "".join(f"  {run['stages_s'][name]:>22.2f}" for run in runs))
    print(f"{'whole script run':46s}" + "".join(f"  {run['script_s']:>22.2f}" for run in runs))
    if args.json:
        args.json.write_text(json.dumps({"repo": str(args.repo), "runs": runs}, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
