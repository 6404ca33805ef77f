"""Counterfactual evaluation: LDS per step, retrain-without-top-k, reports (``attribution bench``)."""

#: Help line of ``attribution bench`` (here so the CLI can list the command without importing the benchmark).
BENCH_HELP = "counterfactual benchmark: LDS per step, retrain without top-k, report"
