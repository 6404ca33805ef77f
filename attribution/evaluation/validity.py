"""What a benchmark measures and whether its ground truth can tell methods apart.

Three subset designs (:mod:`.designs`) answer different questions:

* ``stratified``: every subset keeps each class's share, so the class-level effect a correct
  method must predict is removed; what is left is the within-class effect;
* ``dirichlet``: class proportions drawn from Dirichlet(alpha), so f_t moves with how much of
  the sample's class (and of look-alike styles) a subset holds;
* ``groups``: one model per removed group (a class, or a style cluster within a class); the
  prediction of Delta f_t is the sum of the scores over the removed group.

The validity of a truth is its seed-vs-seed agreement: Spearman's rho across subsets between
the true outputs of two training seeds of the same subsets. Below :data:`VALIDITY_THRESHOLD`
retraining noise dominates the truth, and its LDS means little.
"""

from __future__ import annotations

import json
from pathlib import Path

VALIDITY_THRESHOLD = 0.5

DESIGN_TEXT = {
    "stratified": ("within-class", "class-stratified random 50 % subsets: every subset keeps each class's share, so the "
                   "LDS measures within-class effects only (which images of a class matter), not the class-level "
                   "effect a correct method must also predict"),
    "dirichlet": ("class-varying", "random 50 % subsets whose class proportions are drawn from a Dirichlet: the true "
                  "f_t moves with how much of the sample's class and of look-alike styles a subset holds"),
    "groups": ("group counterfactuals", "one retrained model per removed group (a whole class, or a style cluster of "
               "classifier embeddings within a class): the LDS is Spearman's rho across the groups between the summed "
               "scores of the removed group and the measured change of f_t"),
}


def design_of(lds: dict) -> str:
    """The subset design of an ``lds.json`` result (``stratified`` for results written before designs existed)."""
    return lds["bench"].get("subset_design", "stratified")


def design_label(lds: dict) -> str:
    return DESIGN_TEXT[design_of(lds)][0]


def design_description(lds: dict) -> str:
    return DESIGN_TEXT[design_of(lds)][1]


def truth_validity(lds: dict) -> float | None:
    """Seed-vs-seed agreement of the truth (overall mean over steps), or None with one training seed."""
    agree = lds.get("replicate_agreement")
    return None if not agree else float(agree["overall"])


def validity_message(lds: dict) -> str:
    """One sentence on whether this benchmark can arbitrate between methods."""
    v = truth_validity(lds)
    if v is None:
        return ("Truth validity unknown: one training seed per subset, so the seed-vs-seed agreement of the truth "
                "cannot be measured; read the LDS with care.")
    if v < VALIDITY_THRESHOLD:
        return (f"Truth agreement ρ = {v:.2f} (two training seeds of the same subsets), below {VALIDITY_THRESHOLD}: "
                "retraining noise dominates this ground truth, so its LDS means little and cannot rank the methods.")
    return f"Truth agreement ρ = {v:.2f} (two training seeds of the same subsets): the truth is mostly signal."


def group_rows(lds: dict) -> list[dict]:
    """Group-counterfactual metrics per method (groups design): Spearman and sign agreement per step, as rows."""
    groups = lds.get("groups")
    if not groups:
        return []
    steps = lds["steps"]
    rows = []
    for name, g in groups["methods"].items():
        sign = lds["methods"].get(name, {}).get("sign", 1.0)
        row = {"method": name, "sign (validation)": f"{sign:+.0f}"}
        row.update({f"ρ step {s}": f"{sign * v:+.2f}" for s, v in zip(steps, g["spearman"])})
        agree = [a if sign > 0 else 1 - a for a in g["sign_agreement"]]
        row["sign agreement (mean)"] = f"{sum(agree) / len(agree):.2f}"
        rows.append(row)
    return rows


def load_variants(work: Path) -> dict[str, dict]:
    """Other ``lds_*.json`` results of a work directory (e.g. ``--draw-sharing common``), without per-query data."""
    out = {}
    for path in sorted(work.glob("lds_*.json")):
        lds = json.loads(path.read_text())
        out[path.stem.removeprefix("lds_")] = {
            "featurize": lds["featurize"], "truth_replicates": lds.get("truth_replicates", 1),
            "methods": {m: {k: r[k] for k in ("label", "num_draws", "ridge", "sign", "mean", "se", "overall",
                                               "overall_se") if k in r} for m, r in lds["methods"].items()},
        }
    return out


def variant_rows(report: dict) -> list[dict]:
    """One row per (variant, method) of :func:`load_variants`: overall and per-step LDS."""
    steps = report["lds"]["steps"]
    rows = []
    for variant, v in report.get("lds_variants", {}).items():
        f = v["featurize"]
        how = f"{f.get('draw_sharing', 'per-example')} draws, {f['proj_kind']} d={f['proj_dim']}"
        for name, r in v["methods"].items():
            row = {"variant": variant, "train features": how, "method": name,
                   "mean LDS": f"{r['overall']:+.3f} ± {r['overall_se']:.3f}"}
            row.update({f"step {s}": f"{m:+.2f}" for s, m in zip(steps, r["mean"])})
            row["draws / ridge / sign"] = f"{r['num_draws']} / {r['ridge']} / {r['sign']:+.0f}"
            rows.append(row)
    return rows
