"""Time from a fresh process to the first attribution on the bundled default (what the app does on first load).

Usage: python benchmarks/time_first_attribution.py
"""

import time

t0 = time.perf_counter()
from attribution.workspace import Workspace, default_bundle

t_import = time.perf_counter()
ws = Workspace(default_bundle(), device="cpu")
t_load = time.perf_counter()
key, traj = ws.generate(seed=0)
t_gen = time.perf_counter()
ws.scores(key, "journey", [25])
t_first = time.perf_counter()
ws.scores(key, "journey", [30])
t_second = time.perf_counter()
ws.scores(key, "journey", list(range(50)))
t_all = time.perf_counter()
print(f"imports {t_import - t0:.1f} s | load models, data, classifier {t_load - t_import:.1f} s | "
      f"generate 50 steps {t_gen - t_load:.2f} s | first step scores (opens store, kernels) {t_first - t_gen:.1f} s | "
      f"next step {t_second - t_first:.2f} s | remaining 48 steps {t_all - t_second:.1f} s | total to first attribution {t_first - t0:.1f} s")
