"""The benchmark report: one JSON file, a Markdown file with the tables, and plotly HTML figures.

``report.json`` holds everything the app's Evaluate page shows; per-query LDS values
stay in the work directory (``lds.json``) to keep the committed files small.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from .counterfactual import paired_by_seed
from .figures import counterfactual_figure, lds_figure, step_correlation_figure
from .validity import design_description, design_label, group_rows, load_variants, validity_message, variant_rows

REPORT_JSON = "report.json"
REPORT_MD = "report.md"


#: Where ``attribution bench report`` writes by default (relative to the repository root).
DEFAULT_REPORT_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "bench"


def load_report(directory: Path = DEFAULT_REPORT_DIR) -> dict | None:
    """The report dict written by :func:`write_report`, or None when there is none."""
    path = Path(directory) / REPORT_JSON
    return json.loads(path.read_text()) if path.exists() else None


def report_dirs(directory: Path = DEFAULT_REPORT_DIR) -> list[Path]:
    """``directory`` and its siblings named ``<its name>-<variant>`` (e.g. ``bench-coupled``) that hold a report."""
    directory = Path(directory)
    siblings = sorted(p for p in directory.parent.glob(f"{directory.name}-*") if (p / REPORT_JSON).exists())
    return [directory] + siblings


def report_label(report: dict) -> str:
    """How a report's subset models were retrained, in a few words (to choose between reports)."""
    lds = report["lds"]
    how = "coupled retraining" if lds["bench"].get("subset_coupled") else "independent retraining"
    reps = lds.get("truth_replicates", 1)
    return f"{design_label(lds)}, {how}, {reps} training seed{'s' if reps > 1 else ''} per subset"


def lds_rows(report: dict) -> list[dict]:
    """The LDS table as rows for display: method, per-step "mean ± se", overall, chosen setting."""
    lds = report["lds"]
    ranked = sorted(lds["methods"].items(), key=lambda kv: -kv[1]["overall"])
    return _result_rows(ranked, "method", [f"step {s}" for s in lds["steps"]])


def _result_rows(results: Iterable[tuple[str, dict]], name_column: str, step_columns: list[str]) -> list[dict]:
    """Display rows of (name, LDS result) pairs: name, overall "mean ± se", one cell per step, chosen setting."""
    rows = []
    for name, r in results:
        row = {name_column: name, "mean LDS": _fmt(r["overall"], r["overall_se"]),
               "s.e. over subsets": _fmt(r.get("overall_se_subsets")),
               "chosen on other subsets": _fmt(r.get("overall_crossfit"))}
        row.update({c: _fmt(m, e, 2) for c, m, e in zip(step_columns, r["mean"], r["se"])})
        row["draws / ridge / sign"] = f"{r['num_draws']} / {r['ridge']} / {r['sign']:+.0f}"
        rows.append(row)
    return rows


def _metric_cells(r: dict) -> dict:
    return {"pixel l2": _fmt(r["pixel_l2"], r["pixel_l2_se"], 2),
            "feature distance": _fmt(r["feature_dist"], r["feature_dist_se"], 2),
            "class changed": _fmt(r["class_changed"], r.get("class_changed_se"), 2),
            "Δf_t": _fmt_sci(r["delta_f"], r["delta_f_se"])}


def counterfactual_rows(report: dict) -> list[dict]:
    """The counterfactual summary as display rows (empty when it was not run)."""
    cf = report.get("counterfactual") or {}
    return [{"removal": r["kind"], "k": r["k"], "queries": r["n"], "training seeds": r.get("seeds", 1),
             **_metric_cells({**r, "class_changed_se": None})}
            for r in cf.get("summary", [])]


def counterfactual_paired_rows(report: dict, by_seed: bool = False) -> list[dict]:
    """Each ranking rule minus random removal of the same k, queries and seeds (empty when not run);
    ``by_seed``: one row per training seed too (only when there are several)."""
    cf = report.get("counterfactual") or {}
    if not by_seed:
        return [{"removal minus random": r["kind"], "k": r["k"], "queries": r["n"], **_metric_cells(r)}
                for r in cf.get("paired_with_random", [])]
    if len(cf.get("train_seeds", [0])) < 2 or not cf.get("rows"):
        return []
    return [{"training seed": r["train_seed"], "removal minus random": r["kind"], "k": r["k"], "queries": r["n"],
             **_metric_cells(r)} for r in paired_by_seed(cf["rows"])]


def _markdown(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    return "\n".join(lines + ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows])


def build_report(work: Path) -> dict:
    """Read ``lds.json`` and (if present) ``counterfactual.json`` from ``work`` into one report dict."""
    lds_path = work / "lds.json"
    if not lds_path.exists():
        raise FileNotFoundError(f"{lds_path} is missing; run `attribution bench lds --work {work}` first")
    lds = json.loads(lds_path.read_text())
    for r in lds["methods"].values():
        r.pop("per_query", None)
        r.pop("bootstrap", None)
    report = {"lds": lds}
    cf = work / "counterfactual.json"
    if cf.exists():
        report["counterfactual"] = json.loads(cf.read_text())
    ab = work / "ablation.json"
    if ab.exists():
        report["ablation"] = json.loads(ab.read_text())
        for r in report["ablation"]["variants"].values():
            r.pop("per_query", None)
            r.pop("bootstrap", None)
    variants = load_variants(work)
    if variants:
        report["lds_variants"] = variants
    for name in ("retrain_seconds.json",):
        if (work / name).exists():
            report[name.removesuffix(".json")] = json.loads((work / name).read_text())
    return report


def _fmt(v: float | None, se: float | None = None, digits: int = 3) -> str:
    if v is None:
        return "–"
    return f"{v:.{digits}f}" if se is None else f"{v:.{digits}f} ± {se:.{digits}f}"


def _fmt_sci(v: float | None, se: float | None = None) -> str:
    """Scientific notation (Δf_t is ~1e-4 of an f_t ~ 0.2)."""
    if v is None:
        return "–"
    return f"{v:.2e}" if se is None else f"{v:.2e} ± {se:.1e}"


def lds_table(report: dict) -> str:
    """Markdown table: one row per method, one column per step, plus the mean over steps."""
    lds = report["lds"]
    head = ("| method | " + " | ".join(f"step {s} (t={t})" for s, t in zip(lds["steps"], lds["timesteps"]))
            + " | mean ± s.e. (queries) | s.e. (subsets) | chosen on other subsets | setting |")
    sep = "|" + "---|" * (len(lds["steps"]) + 5)
    rows = [head, sep]
    for name, r in sorted(lds["methods"].items(), key=lambda kv: -kv[1]["overall"]):
        cells = [_fmt(m, s, 2) for m, s in zip(r["mean"], r["se"])]
        setting = f"draws {r['num_draws']}, ridge {r['ridge']}, sign {r['sign']:+.0f}" if r["num_draws"] else f"sign {r['sign']:+.0f}"
        rows.append(f"| {name} | " + " | ".join(cells) + f" | **{_fmt(r['overall'], r['overall_se'])}** | "
                    f"{_fmt(r.get('overall_se_subsets'))} | {_fmt(r.get('overall_crossfit'))} | {setting} |")
    return "\n".join(rows)


def margins_table(report: dict, reference: str = "journey") -> str:
    """journey-TRAK minus every other method, per step (mean difference over the same queries ± s.e.)."""
    methods = report["lds"]["methods"]
    if reference not in methods or "paired" not in report["lds"]:
        return ""
    lds = report["lds"]
    head = "| journey minus | " + " | ".join(f"step {s}" for s in lds["steps"]) + " | mean ± s.e. (queries) | s.e. (subsets) |"
    rows = [head, "|" + "---|" * (len(lds["steps"]) + 3)]
    for name, d in lds["paired"].items():
        rows.append(f"| {name} | " + " | ".join(_fmt(m, s, 2) for m, s in zip(d["mean"], d["se"]))
                    + f" | {_fmt(d['overall'], d['overall_se'])} | {_fmt(d.get('overall_se_subsets'))} |")
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
    reps = report["ablation"].get("truth_replicates", 1)
    lines = [f"Ground truth of these rows: {reps} training seed(s) per subset"
             + (" (an earlier run than the main table's)" if reps != report["lds"].get("truth_replicates", 1) else "")
             + ".", "", _markdown(rows)]
    ridges = ablation_ridges(report)
    if ridges:
        lines += ["", "Ridge grid of the ablation: " + ", ".join(f"{r:g}" for r in ridges) + "."]
    return "\n".join(lines)


def counterfactual_table(report: dict) -> str:
    cf = report.get("counterfactual")
    if not cf:
        return "_not run_"
    lines = [
        f"Removals ranked at step {cf['step']} (t = {cf['timestep']}) for queries {cf['query_rows']}; every removal "
        f"retrained with training seed(s) {cf.get('train_seeds', [0])}"
        + (" by replaying the full-data run of that seed without the removed rows (same shuffling, timesteps and "
           "noises: coupled)" if cf.get("coupled") else "")
        + " and compared with the full-data model of the same seed; per query the seeds are averaged, then mean ± "
        "s.e. over queries.",
        "",
        _markdown(counterfactual_rows(report)),
    ]
    paired = counterfactual_paired_rows(report)
    if paired:
        lines += ["", "Paired with random removal of the same k (same queries and seeds): the rule's value minus "
                  "random's (positive = the rule's k removals moved the sample more / raised f_t more). A method's top-k "
                  "should raise f_t and its METHOD-bottom k (its most negative scores) lower it.", "", _markdown(paired)]
    per_seed = counterfactual_paired_rows(report, by_seed=True)
    if per_seed:
        lines += ["", f"The same within each training seed. The queries were generated by seed {cf['train_seeds'][0]}'s "
                  "model (checkpoint 0); the other seeds' models are retrained from other runs and evaluated at those "
                  "queries' inputs.", "", _markdown(per_seed)]
    return "\n".join(lines)


def replicate_table(report: dict) -> str:
    """How much of the ground truth a method can predict: seed-to-seed and query-to-query Spearman per step."""
    lds = report["lds"]
    agree, cross = lds.get("replicate_agreement"), lds.get("cross_query_agreement")
    if not agree and not cross:
        return ""
    head = " | ".join(f"step {s}" for s in lds["steps"])
    lines = [
        "How much of the ground truth is there to predict (Spearman's rho across subsets, mean over reported queries):",
        "",
        "- *seed vs seed*: the true outputs of two training seeds of the same subsets. It is the LDS one seed's "
        "outputs would get as a predictor of another's; a perfect predictor of the seed-free part gets about its "
        "square root against one seed, so noise in the truth caps every method's LDS.",
        "- *query vs query*: two different queries of the same seed. Near 1, a subset's model is better or worse for "
        "every query alike: the LDS then rewards predicting that global effect, and the queries are not independent "
        "draws (hence the s.e. over subsets, by bootstrap, in the table above).",
        "",
        f"| truth | {head} | mean |", "|---|" + "---|" * (len(lds["steps"]) + 1),
    ]
    if agree:
        cells = " | ".join(_fmt(m, e, 2) for m, e in zip(agree["mean"], agree["se"]))
        lines.append(f"| seed vs seed ({agree['pairs']} pair(s)) | {cells} | {_fmt(agree['overall'], agree['overall_se'])} |")
    if cross:
        lines.append("| query vs query | " + " | ".join(_fmt(v, None, 2) for v in cross) + f" | {_fmt(sum(cross) / len(cross))} |")
    return "\n".join(lines)


QUERY_SPECIFIC_CAPTION = (
    "Query-specific LDS: predictions and true outputs minus their mean over the reported queries, so what a subset "
    "does to every query alike cancels; it asks whether a method predicts which subsets help *this* sample more "
    "than the others (settings as chosen for the main table)."
)


def query_specific_rows(report: dict) -> list[dict]:
    """The query-specific LDS per method as display rows (empty for reports without it)."""
    lds = report["lds"]
    qs = lds.get("analyses", {}).get("query_specific_lds") or {}
    rows = []
    for name, r in sorted(qs.items(), key=lambda kv: -kv[1]["overall"]):
        row = {"method": name, "mean": _fmt(r["overall"], r["overall_se"])}
        row.update({f"step {s}": _fmt(m, e, 2) for s, m, e in zip(lds["steps"], r["mean"], r["se"])})
        rows.append(row)
    return rows


def query_specific_table(report: dict) -> str:
    rows = query_specific_rows(report)
    return f"{QUERY_SPECIFIC_CAPTION}\n\n{_markdown(rows)}" if rows else ""


def overlap_table(report: dict) -> str:
    an = report["lds"].get("analyses", {})
    ov = an.get("top_k_overlap", {})
    rows = [f"| method | distinct examples in the top-{next(iter(ov.values()))['k'] if ov else 10} lists | "
            "examples in > 20 % of lists | largest share of lists |", "|---|---|---|---|"]
    for name, o in ov.items():
        rows.append(f"| {name} | {o['distinct']} | {o['frequent']} | {o['max_share']:.2f} |")
    return "\n".join(rows)


def _write_truth(work: Path, out_dir: Path) -> None:
    """Bundle the cached ground truth into ``truth.npz``: ``truth_replicates`` (R, m, Q, S) float32 of the R
    training seeds every listed subset has, ``truth`` (m, Q, S) their mean, subset ids and masks (m, N)."""
    import numpy as np

    by_subset: dict[int, dict[int, Path]] = {}
    for f in (work / "truth").glob("subset_*.npy"):
        parts = f.stem.split("_")  # subset_XXX or subset_XXX_rR
        by_subset.setdefault(int(parts[1]), {})[int(parts[2][1:]) if len(parts) > 2 else 0] = f
    if not by_subset:
        return
    # the largest R that every subset has (replicate 0 .. R-1), so no subset is dropped
    R = min(next(r for r in range(len(reps) + 1) if r not in reps) for reps in by_subset.values())
    ids = np.array(sorted(by_subset))
    truths = np.stack([np.stack([np.load(by_subset[j][r], allow_pickle=False) for j in ids]) for r in range(R)])
    masks = np.load(work / "subsets.npy", allow_pickle=False)[ids]
    np.savez_compressed(out_dir / "truth.npz", truth=truths.mean(0).astype(np.float32),
                        truth_replicates=truths.astype(np.float32), subset_ids=ids, subsets=masks)


def _replicates_phrase(replicates: int, seed: int) -> str:
    if replicates == 1:
        return f"one model each, training seed {seed}"
    return (f"{replicates} models each, training seeds {seed}-{seed + replicates - 1}; "
            "the ground truth is their mean output")


#: What the D-TRAK paper reports on CIFAR-2 (5,000 images, d = 32,768, generated samples), for scale; LDS x 100.
PUBLISHED_ANCHORS = (
    "Published anchors for scale (D-TRAK paper, CIFAR-2, 5,000 training images, 3 seeds per subset, ridge tuned on "
    "the benchmark itself), LDS x 100: TRAK 16.1, D-TRAK 26.0, pixel similarity 5.4, CLIP similarity 4.2. The "
    "numbers here are Spearman's rho (x 100 to compare) on a far smaller, noisier set-up."
)


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
        f"{len(b['checkpoint_seeds'])} full-data checkpoints; {lds['num_subsets']} subset models ("
        + _replicates_phrase(lds.get("truth_replicates", 1), b["subset_train_seed"])
        + ("; coupled: each replays the full-data run of its seed without the other rows" if b.get("subset_coupled") else "")
        + f"). Queries: {lds['num_queries']} reported + {lds['num_val_queries']} validation samples of "
        f"checkpoint 0 (DDIM 50 steps); K = {lds['num_resamples']} noises; settings (draws, ridge, sign) chosen on the "
        "validation samples only. Featurize base: " + ", ".join(f"{k}={v}" for k, v in lds["featurize"].items()
                                                               if k in ("proj_kind", "proj_dim", "timestep_sampling"))
        + (" (auto: log-stratified draws for the loss output of journey-TRAK, TracIn, ReTrac and final-sample TRAK; "
           "stratified for the ||eps||^2 outputs of D-TRAK and DAS)." if lds["featurize"].get("timestep_sampling") == "auto"
           else "."),
        "",
        f"Design: **{design_label(lds)}**, {design_description(lds)}.",
        "",
        f"**Validity.** {validity_message(lds)}",
        "",
        "## LDS per step (mean ± s.e. over reported queries; s.e. over subsets by bootstrap)",
        "",
        lds_table(report),
        "",
        *(["## Group counterfactuals (Spearman across the removed groups, with the validation-chosen sign)", "",
           _markdown(group_rows(lds)), ""] if group_rows(lds) else []),
        *(["## Variants (other train features, same truth)", "", _markdown(variant_rows(report)), ""]
          if variant_rows(report) else []),
        "Ridge grid (relative): " + ", ".join(f"{r:g}" for r in _ridges(lds["methods"])) + ". \"Chosen on other "
        "subsets\": the setting is chosen on the validation queries of one half of the subsets and reported on the "
        "other half (both ways, averaged), because validation and reported queries share most of their truth.",
        "",
        PUBLISHED_ANCHORS,
        "",
        replicate_table(report),
        "",
        query_specific_table(report),
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
        "## Ablations: train timesteps, checkpoints M, projection dimension d, query noises K",
        "",
        "`attribution bench ablation`: \"all timesteps\" is the method of the table above (draws over the whole "
        f"schedule as in its featurize base, M = {len(b['checkpoint_seeds'])}, d = {lds['featurize']['proj_dim']}); "
        "\"matched\" scores step s against a store whose (timestep, noise) draws all lie in [t_s - w, t_s + w] (one "
        "store per step, `FeaturizeConfig.timestep_range`); \"stratified\" / \"log-stratified draws\" change how the "
        "train timesteps are drawn; \"M = m\" averages only the first m checkpoints; \"d = n\" projects to n "
        "dimensions; \"K = k\" averages the query features over k noises, the first k of the stream whose first "
        f"{lds['num_resamples']} define the ground truth. Settings chosen on the validation queries as above.",
        "",
        ablation_table(report),
        "",
        "Figures: " + ", ".join(f"[{n}]({n})" for n in figs),
        "",
    ]
    path = out_dir / REPORT_MD
    path.write_text("\n".join(md))
    return path
