"""Evaluate: the latest counterfactual benchmark (LDS per step, retrain without top-k)."""

from __future__ import annotations

import os
from pathlib import Path

import streamlit as st

import ui
from attribution.evaluation.class_signal import TARGETS, load_class_signal_results, summary_rows
from attribution.evaluation.figures import counterfactual_figure, lds_figure, step_correlation_figure
from attribution.evaluation.report import (
    DEFAULT_REPORT_DIR,
    PUBLISHED_ANCHORS,
    QUERY_SPECIFIC_CAPTION,
    ablation_ridges,
    ablation_rows,
    counterfactual_paired_rows,
    counterfactual_rows,
    lds_rows,
    load_report,
    query_specific_rows,
    report_dirs,
    report_label,
)
from attribution.evaluation.validity import (
    VALIDITY_THRESHOLD,
    design_description,
    design_label,
    group_rows,
    truth_validity,
    validity_message,
    variant_rows,
)

ui.page_header(
    "Evaluate",
    "How well each method predicts what happens when the training set changes: LDS at every step, "
    "and how far a sample moves when its top influencers are removed and the model is retrained.",
)

directory = Path(os.environ.get("ATTRIBUTION_BENCH_REPORT", DEFAULT_REPORT_DIR))
class_signal = load_class_signal_results(directory.parent)
if class_signal:
    with st.expander("Do the influencers share the generated digit's class? (`attribution bench class-signal`)"):
        st.caption("Per store and method: the share of the top-8 positive and negative influencers that have the "
                   "class the bundled classifier gives the generated sample, and how often that class has the largest "
                   "summed score, in % (mean ± s.e. over samples not used to choose settings). " + TARGETS)
        for name, result in class_signal.items():
            spec = result["spec"]
            shipped = result["store"].startswith("assets/")
            st.markdown(f"**{name}** (`{result['store']}`{'' if shipped else ', a lab store, not shipped'}): "
                        f"{spec['num_samples']} samples from seed "
                        f"{spec['seed_offset']}; {100 * result['share_confident_0.9']:.0f} % of them classified with "
                        "≥ 0.9 confidence")
            st.dataframe(summary_rows(result["summaries"]), hide_index=True, width="stretch")
reports = {d: r for d in report_dirs(directory) if (r := load_report(d)) is not None}
if len(reports) > 1:
    directory = st.radio("Benchmark", list(reports), format_func=lambda d: f"{d.name}: {report_label(reports[d])}",
                         horizontal=True, key=ui.state.EVALUATE_REPORT)
report = reports.get(directory)
if report is None:
    st.info(
        f"No benchmark report in `{directory}` yet. Run `attribution bench prepare`, `retrain`, `lds`, "
        "`counterfactual` and `report` (see the README) to make one."
    )
    st.stop()

lds = report["lds"]
bench = lds["bench"]
st.markdown(
    f"**Set-up.** {bench['num_train']} training digits at {bench['image_size']}×{bench['image_size']}, "
    f"{len(bench['checkpoint_seeds'])} checkpoints, **{lds['num_subsets']} retrained subset models**, "
    f"{lds['num_queries']} reported query samples (settings chosen on {lds['num_val_queries']} other ones), "
    f"K = {lds['num_resamples']} noises. The LDS is Spearman's ρ between predicted and true step outputs "
    "across the subsets; 1 means the scores rank the retrained models perfectly, 0 means no better than chance."
)
st.markdown(f"**Design: {design_label(lds)}.** {design_description(lds)[0].upper()}{design_description(lds)[1:]}.")
validity = truth_validity(lds)
(st.success if validity is not None and validity >= VALIDITY_THRESHOLD else st.warning)(validity_message(lds))
st.plotly_chart(lds_figure(report), width="stretch")
st.markdown("#### LDS per step (mean ± standard error over query samples)")
st.dataframe(lds_rows(report), hide_index=True, width="stretch")
st.caption(PUBLISHED_ANCHORS)
agree = lds.get("replicate_agreement")
if agree:
    st.caption(
        f"Ground truth: the mean output of {lds['truth_replicates']} models per subset, trained with different seeds. "
        f"Two seeds of the same subsets agree at ρ = {agree['overall']:.2f} ± {agree['overall_se']:.2f} "
        "(Spearman across subsets): retraining itself is that noisy, which caps every method's LDS."
    )

groups = group_rows(lds)
if groups:
    st.markdown("#### Group counterfactuals: does the summed score of a removed group predict its effect?")
    st.caption("Spearman's ρ across the removed groups (classes and style clusters) between the sum of a method's "
               "scores over the group and the measured change of f_t, per step; sign agreement: share of (query, "
               "step, group) where the predicted and the measured change have the same sign (0.5 is chance).")
    st.dataframe(groups, hide_index=True, width="stretch")
variants = variant_rows(report)
if variants:
    st.markdown("#### Variants: other train features, the same ground truth")
    st.dataframe(variants, hide_index=True, width="stretch")

specific = query_specific_rows(report)
if specific:
    st.markdown("#### Does a method know what is special about *this* sample?")
    st.caption(QUERY_SPECIFIC_CAPTION)
    st.dataframe(specific, hide_index=True, width="stretch")

cf_rows = counterfactual_rows(report)
st.markdown("#### Retrain without the top-k influencers")
if cf_rows:
    cf = report["counterfactual"]
    st.caption(
        f"Removals chosen at step {cf['step']} (timestep {cf['timestep']}); {cf['models_done']} of "
        f"{cf['models_expected']} retrained models measured, each against the full-data model of its training seed "
        f"(seeds {cf.get('train_seeds', [0])}"
        + ("; retrained by replaying that model's training run without the removed images" if cf.get("coupled") else "")
        + "). Larger distances mean the removed images mattered more."
    )
    st.dataframe(cf_rows, hide_index=True, width="stretch",
                 column_config={"removal": st.column_config.TextColumn(width="medium")})  # "journey-bottom" fits
    paired = counterfactual_paired_rows(report)
    if paired:
        st.caption("Each rule minus random removal of the same number of images, on the same queries and seeds "
                   "(positive: its removals mattered more than random images). A rule named METHOD-bottom removes "
                   "METHOD's most negative scores instead of its top ones: by the sign convention its Δf_t should be "
                   "negative where the top-k's is positive.")
        st.dataframe(paired, hide_index=True, width="stretch")
    per_seed = counterfactual_paired_rows(report, by_seed=True)
    if per_seed:
        with st.expander("The same within each training seed"):
            st.caption(f"The queries were generated by seed {cf['train_seeds'][0]}'s model; the other seeds' models "
                       "come from other training runs and are evaluated at those queries' inputs.")
            st.dataframe(per_seed, hide_index=True, width="stretch")
    left, right = st.columns(2)
    left.plotly_chart(counterfactual_figure(report, "pixel_l2"), width="stretch")
    right.plotly_chart(counterfactual_figure(report, "feature_dist"), width="stretch")
else:
    st.caption("Not run yet.")

if lds.get("analyses", {}).get("step_correlation"):
    st.markdown("#### Are the scores of one sample similar at different steps?")
    st.plotly_chart(step_correlation_figure(report), width="stretch")

ab_rows = ablation_rows(report)
if ab_rows:
    ridges = ablation_ridges(report)
    ridge_text = f" Ridge chosen on the validation samples from {', '.join(f'{r:g}' for r in ridges)}." if ridges else ""
    st.markdown("#### What moves the LDS? Ablations of the train draws, the checkpoints and the projection")
    st.caption(
        "\"All timesteps\" is the method as in the table above: each train example's gradient is averaged over "
        "(timestep, noise) draws from the whole schedule, in strata of equal width in log(t + T/200) for the loss "
        "output of journey-TRAK and in equal strata for the ||eps||^2 outputs of D-TRAK and DAS; \"stratified\" / "
        "\"log-stratified draws\" swap that choice. \"Matched\" scores step s against features "
        "drawn only around that step's timestep (one store per step); \"M = m\" averages only the first m "
        "checkpoints; \"d = n\" and \"factorized\" change the projection." + ridge_text
        + f" Ground truth of these rows: {report['ablation'].get('truth_replicates', 1)} training seed(s) per subset."
    )
    st.dataframe(ab_rows, hide_index=True, width="stretch", height=35 * (len(ab_rows) + 1) + 3)
