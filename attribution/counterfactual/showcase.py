"""The bundled showcase: precomputed counterfactuals of a few generated samples (``assets/showcase/``).

Each entry is a result directory of :mod:`.run` (PNGs + ``result.json``, no model weights)
named by its request's key, so the app also finds it when a user opens the same sample, step,
rule and k. :func:`reproduce_command` is the one command that recomputes an entry exactly
(training and sampling are deterministic on the CPU); ``benchmarks/showcase.py`` recomputes
them all. The ``random`` control does not depend on the sample: one random set (one retraining)
serves every sample.
"""

from __future__ import annotations

from pathlib import Path

from .run import CounterfactualResult, load_result

__all__ = ["SHOWCASE_K", "SHOWCASE_SEEDS", "SHOWCASE_STEP", "entries", "reproduce_command", "showcase_table"]

SHOWCASE_SEEDS = (0, 1, 2, 3, 4, 5)
SHOWCASE_STEP = 25  # the app's default step (the middle of 50)
SHOWCASE_K = 100


def entries(directory: str | Path) -> list[CounterfactualResult]:
    """Every result under ``directory``, by sample seed, then rule (top before bottom before random)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [r for d in sorted(directory.iterdir()) if d.is_dir() and (r := load_result(d)) is not None]
    order = {"top": 0, "bottom": 1, "random": 2}
    return sorted(found, key=lambda r: (r.meta["sample"].get("seed") or 0, order.get(r.meta["request"]["remove"], 3)))


def reproduce_command(result: CounterfactualResult, store: str = "assets/store/journey", out: str = "cf-out") -> str:
    """The ``attribution counterfactual`` command that recomputes ``result`` (generated samples)."""
    req, sample = result.meta["request"], result.meta["sample"]
    cmd = (f"attribution counterfactual --store {store} --seed {sample['seed']} --step {req['step']} "
           f"--remove {req['remove']} --k {req['k']} --method {req['method']}")
    if sample["num_steps"] != 50:
        cmd += f" --num-steps {sample['num_steps']}"
    if req["remove"] == "random" and req["random_seed"]:
        cmd += f" --random-seed {req['random_seed']}"
    if req["device"] != "cpu":
        cmd += f" --device {req['device']}"
    return cmd + f" --out {out}"


def showcase_table(results: list[CounterfactualResult]) -> list[dict]:
    """One row per (seed): pixel l2, class change and measured / predicted delta f_t of each rule."""
    rows: dict[int, dict] = {}
    for r in results:
        seed, rule, m = r.meta["sample"]["seed"], r.meta["request"]["remove"], r.meta["metrics"]
        row = rows.setdefault(seed, {"seed": seed})
        row[f"{rule}_pixel_l2"] = m["pixel_l2"]
        row[f"{rule}_class_changed"] = m.get("class_changed")
        row[f"{rule}_measured_df"] = m["measured_delta_f"]
        row[f"{rule}_predicted_df"] = m["predicted_delta_f"]
    return [rows[s] for s in sorted(rows)]
