"""The benchmark report: one JSON file, a Markdown file with the tables, and plotly HTML figures.

``report.json`` holds everything the app's Evaluate page shows; per-query LDS values
stay in the work directory (``lds.json``) to keep the committed files small.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from .figures import counterfactual_figure, lds_figure, step_correlation_figure

REPORT_JSON = "report.json"
REPORT_MD = "report.md"


#: Where ``attribution bench report`` writes by default (relative to the repository root).
DEFAULT_REPORT_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "bench"


def load_report(directory: Path = DEFAULT_REPORT_DIR) -> dict | None:
    """The report dict written by :func:`write_report`, or None when there is none."""
    path = Path(directory) / REPORT_JSON
    return json.loads(path.read_text()) if path.exists() else None


def lds_rows(report: dict) -> list[dict]:
    """The LDS table as rows for display: method, per-step "mean ± se", overall, chosen setting."""
    lds = report["lds"]
    ranked = sorted(lds["methods"].items(), key=lambda kv: -kv[1]["overall"])
    return _result_rows(ranked, "method", [f"step {s}" for s in lds["steps"]])


def _result_rows(results: Iterable[tuple[str, dict]], name_column: str, step_columns: list[str]) -> list[dict]:
    """Display rows of (name, LDS result) pairs: name, overall "mean ± se", one cell per step, chosen setting."""
    rows = []
    for name, r in results:
        row = {name_column: name, "mean LDS": _fmt(r["overall"], r["overall_se"])}
        row.update({c: _fmt(m, e, 2) for c, m, e in zip(step_columns, r["mean"], r["se"])})
        row["draws / ridge / sign"] = f"{r['num_draws']} / {r['ridge']} / {r['sign']:+.0f}"
        rows.append(row)
    return rows


def counterfactual_rows(report: dict) -> list[dict]:
    """The counterfactual summary as display rows (empty when it was not run)."""
    cf = report.get("counterfactual") or {}
    return [
        {"removal": r["kind"], "k": r["k"], "queries": r["n"], "pixel l2": _fmt(r["pixel_l2"], r["pixel_l2_se"], 2),
         "feature distance": _fmt(r["feature_dist"], r["feature_dist_se"], 2),
         "class changed": f"{r['class_changed']:.2f}", "Δf_t": _fmt(r["delta_f"], r["delta_f_se"], 4)}
        for r in cf.get("summary", [])
    ]


def build_report(work: Path) -> dict:
    """Read ``lds.json`` and (if present) ``counterfactual.json`` from ``work`` into one report dict."""
    lds_path = work / "lds.json"
    if not lds_path.exists():
        raise FileNotFoundError(f"{lds_path} is missing; run `attribution bench lds --work {work}` first")
    lds = json.loads(lds_path.read_text())
    for r in lds["methods"].values():
        r.pop("per_query", None)
    report = {"lds": lds}
    cf = work / "counterfactual.json"
    if cf.exists():
        report["counterfactual"] = json.loads(cf.read_text())
    ab = work / "ablation.json"
    if ab.exists():
        report["ablation"] = json.loads(ab.read_text())
        for r in report["ablation"]["variants"].values():
            r.pop("per_query", None)
    for name in ("retrain_seconds.json",):
        if (work / name).exists():
            report[name.removesuffix(".json")] = json.loads((work / name).read_text())
    return report


def _fmt(v: float | None, se: float | None = None, digits: int = 3) -> str:
    if v is None:
        return "–"
    return f"{v:.{digits}f}" if se is None else f"{v:.{digits}f} ± {se:.{digits}f}"


def lds_table(report: dict) -> str:
    """Markdown table: one row per method, one column per step, plus the mean over steps."""
    lds = report["lds"]
    head = "| method | " + " | ".join(f"step {s} (t={t})" for s, t in zip(lds["steps"], lds["timesteps"])) + " | mean | setting |"
    sep = "|" + "---|" * (len(lds["steps"]) + 3)
    rows = [head, sep]
    for name, r in sorted(lds["methods"].items(), key=lambda kv: -kv[1]["overall"]):
        cells = [_fmt(m, s, 2) for m, s in zip(r["mean"], r["se"])]
        setting = f"draws {r['num_draws']}, ridge {r['ridge']}, sign {r['sign']:+.0f}" if r["num_draws"] else f"sign {r['sign']:+.0f}"
        rows.append(f"| {name} | " + " | ".join(cells) + f" | **{_fmt(r['overall'], r['overall_se'])}** | {setting} |")
    return "\n".join(rows)


def margins_table(report: dict, reference: str = "journey") -> str:
    """journey-TRAK minus every other method, per step (mean difference over the same queries ± s.e.)."""
    methods = report["lds"]["methods"]
    if reference not in methods or "paired" not in report["lds"]:
        return ""
    lds = report["lds"]
    head = "| journey minus | " + " | ".join(f"step {s}" for s in lds["steps"]) + " | mean |"
    rows = [head, "|" + "---|" * (len(lds["steps"]) + 2)]
    for name, d in lds["paired"].items():
        rows.append(f"| {name} | " + " | ".join(_fmt(m, s, 2) for m, s in zip(d["mean"], d["se"]))
                    + f" | {_fmt(d['overall'], d['overall_se'])} |")
    return "\n".join(rows)


def ablation_rows(report: dict) -> list[dict]:
    """The timestep ablation as display rows (empty when it was not run)."""
    ab = report.get("ablation")
    if not ab:
        return []
    return _result_rows(ab["variants"].items(), "variant", [f"t={t}" for t in ab["timesteps"]])


def _ridges(results: dict) -> list[float]:
    """The relative ridges the validation selection of these results tried."""
    return sorted({s["ridge"] for r in results.values() for s in r.get("selection", []) if s["ridge"] is not None})


def ablation_ridges(report: dict) -> list[float]:
    """The relative ridges the ablation's selection tried (they may differ from the main table's grid)."""
    return _ridges((report.get("ablation") or {}).get("variants", {}))


def ablation_table(report: dict) -> str:
    """Markdown version of :func:`ablation_rows`, with the ridge grid it chose from."""
    rows = ablation_rows(report)
    if not rows:
        return "_not run_"
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    ridges = ablation_ridges(report)
    if ridges:
        lines += ["", "Ridge grid of the ablation: " + ", ".join(f"{r:g}" for r in ridges) + "."]
    return "\n".join(lines)


def counterfactual_table(report: dict) -> str:
    cf = report.get("counterfactual")
    if not cf:
        return "_not run_"
    rows = ["| removal | k | n | pixel l2 | classifier-feature distance | class changed | Δf_t |", "|---|---|---|---|---|---|---|"]
    for r in cf["summary"]:
        rows.append(f"| {r['kind']} | {r['k']} | {r['n']} | {_fmt(r['pixel_l2'], r['pixel_l2_se'], 2)} | "
                    f"{_fmt(r['feature_dist'], r['feature_dist_se'], 2)} | {_fmt(r['class_changed'], None, 2)} | "
                    f"{_fmt(r['delta_f'], r['delta_f_se'], 4)} |")
    return "\n".join(rows)


def overlap_table(report: dict) -> str:
    an = report["lds"].get("analyses", {})
    ov = an.get("top_k_overlap", {})
    rows = [f"| method | distinct examples in the top-{next(iter(ov.values()))['k'] if ov else 10} lists | "
            "examples in > 20 % of lists | largest share of lists |", "|---|---|---|---|"]
    for name, o in ov.items():
        rows.append(f"| {name} | {o['distinct']} | {o['frequent']} | {o['max_share']:.2f} |")
    return "\n".join(rows)


def _write_truth(work: Path, out_dir: Path) -> None:
    """Bundle the cached ground truth into ``truth.npz``: truth (m, Q, S) float32, subset ids, masks (m, N)."""
    import numpy as np

    files = sorted((work / "truth").glob("subset_*.npy"))
    if not files:
        return
    ids = np.array([int(f.stem.split("_")[1]) for f in files])
    truth = np.stack([np.load(f, allow_pickle=False) for f in files]).astype(np.float32)
    masks = np.load(work / "subsets.npy", allow_pickle=False)[ids]
    np.savez_compressed(out_dir / "truth.npz", truth=truth, subset_ids=ids, subsets=masks)


def write_report(work: Path, out_dir: Path) -> Path:
    """Write report.json, report.md and the HTML figures into ``out_dir``; returns the Markdown path."""
    report = build_report(work)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / REPORT_JSON).write_text(json.dumps(report, indent=1))
    figs = {"lds_vs_step.html": lds_figure(report)}
    if report["lds"].get("analyses"):
        figs["step_correlation.html"] = step_correlation_figure(report)
    if report.get("counterfactual", {}).get("summary"):
        figs["counterfactual_pixel_l2.html"] = counterfactual_figure(report, "pixel_l2")
        figs["counterfactual_feature_dist.html"] = counterfactual_figure(report, "feature_dist")
    for name, fig in figs.items():
        fig.write_html(out_dir / name, include_plotlyjs="cdn")
    _write_truth(work, out_dir)
    lds = report["lds"]
    b = lds["bench"]
    md = [
        "# Counterfactual benchmark: LDS per step, retrain without top-k",
        "",
        f"Training set: {b['num_train']} bundled digits (stratified), average-pooled to {b['image_size']}x{b['image_size']}; "
        f"UNet2DModel block_out_channels {b['train']['block_out_channels']}, {b['train']['epochs']} epochs; "
        f"{len(b['checkpoint_seeds'])} full-data checkpoints; {lds['num_subsets']} random 50 % subsets (one model each, seed "
        f"{b['subset_train_seed']}). Queries: {lds['num_queries']} reported + {lds['num_val_queries']} validation samples of "
        f"checkpoint 0 (DDIM 50 steps); K = {lds['num_resamples']} noises; settings (draws, ridge, sign) chosen on the "
        "validation samples only. Featurize base: " + ", ".join(f"{k}={v}" for k, v in lds["featurize"].items()
                                                               if k in ("proj_kind", "proj_dim", "timestep_sampling"))
        + (" (auto: log-stratified draws for the loss output of journey-TRAK, TracIn, ReTrac and final-sample TRAK; "
           "stratified for the ||eps||^2 outputs of D-TRAK and DAS)." if lds["featurize"].get("timestep_sampling") == "auto"
           else "."),
        "",
        "## LDS per step (mean ± s.e. over reported queries)",
        "",
        lds_table(report),
        "",
        "Ridge grid (relative): " + ", ".join(f"{r:g}" for r in _ridges(lds["methods"])) + ".",
        "",
        margins_table(report),
        "",
        f"## Generally influential examples (top-k across queries, step {lds.get('analyses', {}).get('step')})",
        "",
        overlap_table(report),
        "",
        "## Retrain without top-k",
        "",
        counterfactual_table(report),
        "",
        "## Ablations: train timesteps, checkpoints M, projection dimension d",
        "",
        "`attribution bench ablation`: \"all timesteps\" is the method of the table above (stratified draws, "
        f"M = {len(b['checkpoint_seeds'])}, d = {lds['featurize']['proj_dim']}); \"matched\" scores step s against a store "
        "whose (timestep, noise) draws all lie in [t_s - w, t_s + w] (one store per step, "
        "`FeaturizeConfig.timestep_range`); \"M = m\" averages only the first m checkpoints; \"d = n\" projects to n "
        "dimensions. Settings chosen on the validation queries as above. K is not ablated: the ground truth is "
        "defined with the same K noises.",
        "",
        ablation_table(report),
        "",
        "Figures: " + ", ".join(f"[{n}]({n})" for n in figs),
        "",
    ]
    path = out_dir / REPORT_MD
    path.write_text("\n".join(md))
    return path
