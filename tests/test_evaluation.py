"""LDS, Spearman, DAS and destination methods, and the benchmark pipeline end to end on tiny data."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from attribution.evaluation.lds import lds, predicted_outputs, rankdata, spearman, subset_bootstrap, summarize


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, size=(4, 30)).astype(float)
    b = rng.normal(size=(4, 30))
    ours = spearman(a, b)
    ref = [stats.spearmanr(a[i], b[i]).statistic for i in range(4)]
    np.testing.assert_allclose(ours, ref, atol=1e-12)
    np.testing.assert_allclose(rankdata([3.0, 1.0, 3.0]), [2.5, 1.0, 2.5])


def _linear_benchmark(rng, q=20, s=3, n=60, m=64, noise=0.0):
    scores = rng.normal(size=(q, s, n))
    subsets = rng.random((m, n)) < 0.5
    # a linear datamodel with the sign convention: including a positive example lowers f
    truth = np.moveaxis(-(scores @ subsets.T.astype(float)), -1, 0) + noise * rng.normal(size=(m, q, s))
    return scores, subsets, truth


def test_linear_datamodel_gives_lds_one():
    rng = np.random.default_rng(1)
    scores, subsets, truth = _linear_benchmark(rng)
    values = lds(scores, subsets, truth)
    np.testing.assert_allclose(values, 1.0, atol=1e-12)
    assert np.all(lds(scores, subsets, truth, sign=-1.0) < -0.99)


def test_shuffled_scores_give_lds_near_zero():
    rng = np.random.default_rng(2)
    scores, subsets, truth = _linear_benchmark(rng, q=40, noise=0.5)
    shuffled = rng.permuted(scores, axis=-1)
    s = summarize(lds(shuffled, subsets, truth))
    assert abs(s.overall) < 3 * s.overall_se + 0.05
    good = summarize(lds(scores, subsets, truth))
    assert good.overall > 0.9


def test_summary_standard_error():
    values = np.array([[0.1, 0.5], [0.3, np.nan], [0.5, 0.7]])
    s = summarize(values)
    np.testing.assert_allclose(s.mean, [0.3, 0.6])
    np.testing.assert_allclose(s.se[0], np.std([0.1, 0.3, 0.5], ddof=1) / np.sqrt(3))
    with pytest.raises(ValueError):
        lds(np.zeros((2, 3, 4)), np.zeros((5, 4), bool), np.zeros((5, 2, 2)))


def test_subset_bootstrap_matches_the_spread_over_fresh_subsets():
    """When one global subset effect drives every query's truth, the spread of the overall LDS over fresh
    draws of the subsets is far larger than the s.e. over queries; the bootstrap recovers it from one draw."""
    rng = np.random.default_rng(4)
    q, s, n, m = 20, 2, 40, 48
    scores = rng.normal(size=(1, 1, n)) + 0.2 * rng.normal(size=(q, s, n))  # queries rank the examples alike

    def draw():
        subsets = rng.random((m, n)) < 0.5
        effect = rng.normal(size=(m, 1, 1))  # one number per subset, shared by every query
        truth = np.moveaxis(-(scores @ subsets.T.astype(float)), -1, 0) * 0.1 + effect
        return subsets, truth

    overall = [summarize(lds(scores, *draw())).overall for _ in range(60)]
    subsets, truth = draw()
    boot = subset_bootstrap(scores, subsets, truth, num=300)
    spread, query_se = np.std(overall, ddof=1), summarize(lds(scores, subsets, truth)).overall_se
    assert query_se < 0.5 * spread
    assert 0.5 * spread < boot.std(ddof=1) < 2.0 * spread
    # the same seed draws the same resamples: paired differences of a method with itself are 0
    np.testing.assert_array_equal(boot, subset_bootstrap(scores, subsets, truth, num=300))


def test_query_specific_lds_ignores_what_every_query_shares():
    """A truth that is one global subset effect plus a query-specific linear datamodel: scores that predict only
    the global part get LDS > 0 but query-specific LDS ~ 0; the query-specific scores get ~ 1."""
    from attribution.evaluation.lds import query_specific_lds

    rng = np.random.default_rng(6)
    q, s, n, m = 30, 2, 50, 64
    glob, own = rng.normal(size=(1, s, n)), rng.normal(size=(q, s, n))
    subsets = rng.random((m, n)) < 0.5
    truth = np.moveaxis(-(10 * glob + own) @ subsets.T.astype(float), -1, 0)  # (m, q, s)
    only_global = glob + 0.01 * rng.normal(size=(q, s, n))  # the global part, with a little query-specific noise
    assert summarize(lds(only_global, subsets, truth)).overall > 0.5
    assert abs(summarize(query_specific_lds(only_global, subsets, truth)).overall) < 0.1
    assert summarize(query_specific_lds(10 * glob + own, subsets, truth)).overall > 0.99


def test_crossfit_chooses_on_other_subsets_and_queries():
    """Cross-fitting picks the predictive setting on one half of the subsets and reports it on the other."""
    from types import SimpleNamespace

    from attribution.evaluation.queries import QuerySpec
    from attribution.evaluation.run import LdsRun, SelectionGrid

    rng = np.random.default_rng(7)
    run = SimpleNamespace(spec=QuerySpec(num_queries=6, num_val_queries=4), grid=SelectionGrid())
    good, bad = rng.normal(size=(10, 2, 30)), rng.normal(size=(10, 2, 30))
    subsets = rng.random((40, 30)) < 0.5
    truth = np.moveaxis(good @ subsets.T.astype(float), -1, 0)  # sign -1 of the convention
    value = LdsRun.crossfit(run, {(1, 0.1): bad, (1, 1.0): good}, subsets, truth)
    assert value == pytest.approx(1.0)
    assert abs(LdsRun.crossfit(run, {(1, 0.1): bad}, subsets, truth)) < 0.3


def test_cross_query_agreement_detects_a_global_subset_effect():
    from attribution.evaluation.analyses import cross_query_agreement

    rng = np.random.default_rng(5)
    shared = rng.normal(size=(64, 1, 3)) + 0.1 * rng.normal(size=(64, 10, 3))
    assert min(cross_query_agreement(shared)) > 0.9
    assert abs(np.mean(cross_query_agreement(rng.normal(size=(64, 10, 3))))) < 0.05


def test_replicate_agreement_measures_truth_noise():
    """Two seeds with the same outputs agree at 1; seeds sharing half their variance at ~0.5; independent at ~0."""
    from attribution.evaluation.analyses import replicate_agreement

    rng = np.random.default_rng(3)
    signal = rng.normal(size=(400, 30, 2))  # (m, Q, S)
    assert replicate_agreement(signal[None]) is None
    assert replicate_agreement(np.stack([signal, signal]))["overall"] == pytest.approx(1.0)
    noisy = np.stack([signal + rng.normal(size=signal.shape) for _ in range(3)])
    half = replicate_agreement(noisy)
    assert half["pairs"] == 3 and abs(half["overall"] - 0.48) < 0.05  # Spearman of Pearson 0.5
    independent = replicate_agreement(rng.normal(size=(2, 400, 30, 2)))
    assert abs(independent["overall"]) < 3 * independent["overall_se"] + 0.02


def test_counterfactual_summary_averages_seeds_then_pairs_with_random():
    from attribution.evaluation.counterfactual import paired_by_seed, paired_with_random, summarize_rows

    def row(q, kind, seed, l2):
        return {"query": q, "kind": kind, "k": 5, "train_seed": seed, "pixel_l2": l2, "feature_dist": 2 * l2,
                "class_changed": l2 > 2, "delta_f": 0.1 * l2}

    # per query, the rule moves the sample 1.0 more than random on average over its two seeds
    rows = [row(0, "journey", 0, 3.0), row(0, "journey", 1, 2.0), row(0, "random", 0, 1.0), row(0, "random", 1, 2.0),
            row(1, "journey", 0, 5.0), row(1, "journey", 1, 5.0), row(1, "random", 0, 4.0), row(1, "random", 1, 4.0)]
    summary = {r["kind"]: r for r in summarize_rows(rows)}
    assert summary["journey"]["n"] == 2 and summary["journey"]["seeds"] == 2
    assert summary["journey"]["pixel_l2"] == pytest.approx((2.5 + 5.0) / 2)
    assert summary["journey"]["pixel_l2_se"] == pytest.approx(np.std([2.5, 5.0], ddof=1) / np.sqrt(2))
    (paired,) = paired_with_random(rows)
    assert paired["kind"] == "journey" and paired["n"] == 2
    assert paired["pixel_l2"] == pytest.approx(1.0) and paired["pixel_l2_se"] == pytest.approx(0.0)
    assert paired["delta_f"] == pytest.approx(0.1) and paired["class_changed"] == pytest.approx(0.25)
    # within each seed: seed 0 moves 2.0 and 1.0 more (mean 1.5), seed 1 moves 0.0 and 1.0 more (mean 0.5)
    by_seed = {r["train_seed"]: r for r in paired_by_seed(rows)}
    assert by_seed[0]["pixel_l2"] == pytest.approx(1.5) and by_seed[1]["pixel_l2"] == pytest.approx(0.5)
    assert by_seed[0]["n"] == by_seed[1]["n"] == 2 and by_seed[0]["kind"] == "journey"


def test_removal_models_are_named_by_what_they_removed():
    """A model retrained for another ranking (e.g. after the stores changed) is never measured as this one."""
    from attribution.evaluation.counterfactual import CounterfactualSpec

    name = CounterfactualSpec(query_rows=(10,)).model_name
    assert name("cf_q010_journey_k2", 1, [3, 7]) == name("cf_q010_journey_k2", 1, [3, 7])
    assert name("cf_q010_journey_k2", 1, [3, 7]) != name("cf_q010_journey_k2", 1, [3, 8])
    assert name("cf_q010_journey_k2", 0, [3, 7]).startswith("cf_q010_journey_k2_s0_")
    coupled = CounterfactualSpec(query_rows=(10,), coupled=True).model_name("cf_q010_journey_k2", 0, [3, 7])
    assert coupled.startswith("cf_q010_journey_k2_s0c_")


def test_predicted_outputs_sum_over_subset():
    scores = np.array([[1.0, 2.0, 4.0]])
    subsets = np.array([[True, False, True], [False, True, False]])
    np.testing.assert_allclose(predicted_outputs(scores, subsets), [[-5.0, -2.0]])


# ----------------------------------------------------------------------------- methods
import json  # noqa: E402

import torch  # noqa: E402

from attribution.config import FeaturizeConfig, QueryConfig, SamplingConfig, TrainConfig
from attribution.features import METHODS, draw_timesteps_and_noise, featurize
from attribution.sampling import sample_trajectory
from attribution.scoring import Scorer


@pytest.fixture(scope="module")
def square_store(tiny_models, tiny_dataset, tmp_path_factory):
    cfg = FeaturizeConfig(output="square", proj_dim=48, num_draws=2, store_dtype="float32")
    return featurize(tiny_models[:1], tiny_dataset, tmp_path_factory.mktemp("sq") / "store", cfg)


def test_das_is_residual_weighted_dtrak(tiny_models, tiny_dataset, square_store):
    model = tiny_models[0]
    traj = sample_trajectory(model, SamplingConfig(num_inference_steps=4, seed=3))
    q = QueryConfig(num_resamples=3, ridge=0.1)
    base = Scorer(square_store, tiny_models[:1], "dtrak-square", q).score(traj, [1, 3]).scores
    das = Scorer(square_store, tiny_models[:1], "das", q, dataset=tiny_dataset).score(traj, [1, 3]).scores
    lev = Scorer(square_store, tiny_models[:1], "das-leverage", q, dataset=tiny_dataset).score(traj, [1, 3]).scores
    # residuals by an explicit loop over examples and draws
    n = len(tiny_dataset)
    ts, noises = draw_timesteps_and_noise(np.arange(n), square_store.config, model.num_train_timesteps, model.image_shape)
    x0 = tiny_dataset.images(np.arange(n))
    abar = model.alphas_cumprod
    r = np.zeros(n)
    with torch.no_grad():
        for i in range(n):
            losses = []
            for d in range(ts.shape[1]):
                a = abar[ts[i, d]]
                x_t = a.sqrt() * x0[i] + (1 - a).sqrt() * noises[i, d]
                eps = model.unet(x_t[None], ts[i, d].reshape(1)).sample[0]
                losses.append(float(((eps - noises[i, d]) ** 2).mean()))
            r[i] = np.sqrt(np.mean(losses))
    w = r / r.mean()
    np.testing.assert_allclose(das, base * w, rtol=2e-4, atol=1e-6)
    # leverage h_i = phi_i^T (Phi^T Phi + lambda I)^-1 phi_i, explicit solve
    phi = torch.from_numpy(square_store.read_rows(0, 0, n).astype(np.float64))
    k = phi.T @ phi
    lam = 0.1 * torch.trace(k) / k.shape[0]
    h = (phi * torch.linalg.solve(k + lam * torch.eye(k.shape[0], dtype=k.dtype), phi.T).T).sum(1).numpy()
    assert np.all((h >= 0) & (h < 1))
    np.testing.assert_allclose(lev, base * w / (1 - h) ** 2, rtol=2e-3, atol=1e-6)
    with pytest.raises(ValueError, match="training set"):
        Scorer(square_store, tiny_models[:1], "das", q)


def test_destination_method_is_the_same_at_every_step(tiny_models, tiny_dataset, tmp_path):
    store = featurize(tiny_models, tiny_dataset, tmp_path / "loss", FeaturizeConfig(proj_dim=32, num_draws=1, store_dtype="float32"))
    traj = sample_trajectory(tiny_models[0], SamplingConfig(num_inference_steps=5, seed=1))
    q = QueryConfig(num_resamples=2)
    final = Scorer(store, tiny_models, "trak-final", q).score(traj, [0, 2, 4]).scores
    journey = Scorer(store, tiny_models, "journey", q).score(traj, [0, 2, 4]).scores
    np.testing.assert_array_equal(final[0], final[2])
    assert np.abs(final).max() > 0
    assert not np.allclose(journey[0], journey[2])
    assert {"das", "das-leverage", "trak-final"} <= set(METHODS)


def test_full_mask_retraining_reproduces_the_checkpoint(tmp_path):
    """The counterfactual's zero reference: training is deterministic from its seed."""
    from attribution.models import train_ddpm

    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.uniform(-1, 1, size=(12, 1, 8, 8)).astype(np.float32))
    cfg = TrainConfig(epochs=1, batch_size=4, block_out_channels=(4, 8))
    a = train_ddpm(images, tmp_path / "a", cfg)
    b = train_ddpm(images, tmp_path / "b", cfg, subset=np.ones(12, bool))
    assert (a / "unet/diffusion_pytorch_model.safetensors").read_bytes() == (b / "unet/diffusion_pytorch_model.safetensors").read_bytes()


def test_coupled_subset_training_replays_the_full_run(tmp_path):
    """Coupled: a full mask is the full-data run bit for bit; a subset drops rows from the same minibatches
    (a different model from the fresh run over the subset); the settings record the subset."""
    import json

    from attribution.models import train_ddpm

    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.uniform(-1, 1, size=(12, 1, 8, 8)).astype(np.float32))
    cfg = TrainConfig(epochs=2, batch_size=4, block_out_channels=(4, 8))
    weights = "unet/diffusion_pytorch_model.safetensors"
    full = train_ddpm(images, tmp_path / "full", cfg)
    assert (full / weights).read_bytes() == (train_ddpm(images, tmp_path / "all", cfg, subset=np.ones(12, bool),
                                                        coupled=True) / weights).read_bytes()
    mask = np.arange(12) % 3 != 0
    coupled = train_ddpm(images, tmp_path / "coupled", cfg, subset=mask, coupled=True)
    fresh = train_ddpm(images, tmp_path / "fresh", cfg, subset=mask)
    assert (coupled / weights).read_bytes() != (fresh / weights).read_bytes()
    record = json.loads((coupled / "train_config.json").read_text())
    assert record["coupled_subset"] == np.flatnonzero(mask).tolist() and record["num_images"] == 8
    with pytest.raises(ValueError, match="no training images"):
        train_ddpm(images, tmp_path / "none", cfg, subset=np.zeros(12, bool), coupled=True)


# ----------------------------------------------------------------------------- end to end
def test_bench_pipeline_end_to_end(tiny_bench):
    """prepare -> retrain -> lds -> counterfactual -> report on 20 digits at 8x8 and 8 subsets (conftest)."""
    work, out, methods = tiny_bench["work"], tiny_bench["out"], tiny_bench["methods"]
    assert len(list((work / "models").glob("subset_*"))) == 16  # 8 subsets x 2 training seeds
    lds = json.loads((work / "lds.json").read_text())
    assert set(lds["methods"]) == set(methods) and lds["num_subsets"] == 8 and lds["truth_replicates"] == 2
    agree = lds["replicate_agreement"]
    assert agree["pairs"] == 1 and len(agree["mean"]) == 10 and -1 <= agree["overall"] <= 1
    for name, r in lds["methods"].items():
        assert len(r["mean"]) == len(lds["steps"]) == 10
        vals = np.asarray(r["per_query"])
        assert vals.shape == (3, 10) and np.all(np.abs(vals[~np.isnan(vals)]) <= 1 + 1e-9), name
        # the chosen setting is the best on the validation split
        best = max(s["val_lds"] for s in r["selection"])
        chosen = [s for s in r["selection"] if s["num_draws"] == r["num_draws"] and s["ridge"] == r["ridge"] and s["sign"] == r["sign"]]
        assert chosen[0]["val_lds"] == best
    cf = json.loads((work / "counterfactual.json").read_text())
    assert cf["models_done"] == cf["models_expected"] == 6  # (journey, journey-bottom, random) x training seeds 0, 1
    assert {r["train_seed"] for r in cf["rows"]} == {0, 1} and len(list((work / "models").glob("cf_q002_journey_k2_s1c_*"))) == 1
    assert [(r["kind"], r["n"]) for r in cf["paired_with_random"]] == [("journey", 1), ("journey-bottom", 1)] and cf["coupled"]
    # removals ranked with the ridge the LDS selection chose (draws given on the command line)
    assert cf["settings"]["journey"] == {"num_draws": 1, "ridge": lds["methods"]["journey"]["ridge"]}
    assert all(r["pixel_l2"] > 0 for r in cf["rows"])
    removals = json.loads((work / "removals.json").read_text())
    assert all(len(v) == 2 for v in removals.values())
    assert not set(removals["cf_q002_journey_k2"]) & set(removals["cf_q002_journey-bottom_k2"])  # the two ends
    md = (out / "report.md").read_text()
    assert "| journey |" in md and "Retrain without top-k" in md and "| seed vs seed (1 pair(s)) |" in md
    assert "Queries: 3 reported + 2 validation samples" in md
    assert "| query vs query |" in md
    assert "removal minus random" in md and "Query-specific LDS" in md and "within each training seed" in md
    assert set(lds["analyses"]["query_specific_lds"]) == set(methods)
    assert all(-1 <= r["overall_crossfit"] <= 1 and r["overall_se_subsets"] > 0 for r in lds["methods"].values())
    z = np.load(out / "truth.npz")
    assert z["truth_replicates"].shape == (2, 8, 5, 10)
    np.testing.assert_allclose(z["truth"], z["truth_replicates"].mean(0), rtol=1e-6)
    assert (out / "lds_vs_step.html").exists() and (out / "counterfactual_pixel_l2.html").exists()


def test_bench_timestep_ablation(tiny_bench):
    """`bench ablation`: one store per step with every draw at the step's timestep, scored on the report's truth."""
    from attribution.cli import main

    work, out = tiny_bench["work"], tiny_bench["out"]
    q = ["--num-queries", "3", "--num-val-queries", "2", "--num-resamples", "2", "--proj-dim", "32",
         "--num-draws", "1", "--ridges", "0.1", "1.0"]
    assert main(["bench", "ablation", "--work", str(work), *q, "--matched-draws", "1", "--half-widths", "0",
                 "--proj-dims", "16", "--timestep-samplings", "stratified", "--query-resamples", "1",
                 "--truth", str(out / "truth.npz")]) == 0
    res = json.loads((work / "ablation.json").read_text())
    assert set(res["variants"]) == {"journey all timesteps", "journey matched exactly", "journey d = 16",
                                    "journey stratified draws", "journey K = 1"}
    assert res["truth_replicates"] == 1
    # K = 1 query features are cached apart from the K = 2 ones the truth matches
    assert {p.name.split("-K")[1] for p in (work / "features").glob("loss-x0_hat-sjlt32-*")} >= {"1-n0.npy", "2-n0.npy"}
    # the loss output draws log-stratified timesteps by default ("auto"); the variant draws equal strata
    assert (work / "stores" / "loss-d1-log-stratified-sjlt16").is_dir() and (work / "stores" / "loss-d1-stratified-sjlt32").is_dir()
    assert all(len(r["mean"]) == len(res["steps"]) == 10 for r in res["variants"].values())
    for t in res["timesteps"]:
        manifest = json.loads(next((work / "stores").glob(f"loss-d1-log-stratified-t{t}_{t + 1}-*/manifest.json")).read_text())
        assert manifest["settings"]["timestep_range"] == [t, t + 1]
    report_dir = out.parent / "results_with_ablation"
    assert main(["bench", "report", "--work", str(work), "--out", str(report_dir)]) == 0
    md = (report_dir / "report.md").read_text()
    assert "## Ablations" in md and "| journey matched exactly |" in md
    # another base setting (d) starts a new ablation file instead of mixing bases
    q64 = [a if a != "32" else "64" for a in q]
    assert main(["bench", "ablation", "--work", str(work), *q64, "--half-widths", "--proj-kinds", "factorized",
                 "--methods", "journey", "das", "--truth", str(out / "truth.npz")]) == 0  # das makes its query features
    res = json.loads((work / "ablation.json").read_text())
    assert set(res["variants"]) == {"journey all timesteps", "journey factorized projection", "das all timesteps",
                                    "das factorized projection"}
    assert res["featurize"]["proj_dim"] == 64 and (work / "stores" / "loss-d1-log-stratified-factorized64").is_dir()
    # more checkpoints than the benchmark has is refused
    assert main(["bench", "ablation", "--work", str(work), *q, "--half-widths", "--checkpoint-counts", "3",
                 "--truth", str(out / "truth.npz")]) == 2
    # more training seeds than the truth file holds is refused
    assert main(["bench", "ablation", "--work", str(work), *q, "--half-widths", "--replicates", "3",
                 "--truth", str(out / "truth.npz")]) == 2
    # a truth file of other subsets is refused
    bad = out / "bad_truth.npz"
    z = np.load(out / "truth.npz")
    np.savez(bad, truth=z["truth"], subset_ids=z["subset_ids"], subsets=~z["subsets"])
    assert main(["bench", "ablation", "--work", str(work), *q, "--matched-draws", "1", "--half-widths", "0",
                 "--truth", str(bad)]) == 2


def test_import_truth_seeds_the_cache_so_only_missing_seeds_retrain(tiny_bench, tmp_path):
    """`bench import-truth`: a fresh work dir of the same benchmark takes the report's truths; retraining then
    needs only the full-data checkpoints (and a third seed would need only its own subset models)."""
    from attribution.cli import main
    from attribution.evaluation.retrain import lds_jobs
    from attribution.evaluation.setup import load_prepared

    out = tiny_bench["out"]
    prep = ["--num-train", "20", "--image-size", "8", "--num-checkpoints", "2", "--epochs", "1",
            "--block-out-channels", "4", "8"]
    fresh = tmp_path / "fresh"
    assert main(["bench", "prepare", "--work", str(fresh), *prep, "--num-subsets", "8"]) == 0
    assert main(["bench", "import-truth", "--work", str(fresh), "--truth", str(out / "truth.npz")]) == 0
    config, paths, _, subsets = load_prepared(fresh)
    z = np.load(out / "truth.npz")
    for r in range(2):
        for row, j in enumerate(z["subset_ids"]):
            np.testing.assert_array_equal(np.load(paths.truth_cache(int(j), r)), z["truth_replicates"][r, row])
    jobs = lds_jobs(paths, config, subsets, replicates=3)
    assert [p.name for p, _, _ in jobs] == ["full_s0", "full_s1"] + [f"subset_{j:03d}_r2" for j in range(8)]
    # a second import keeps the caches; a benchmark with other subsets is refused
    assert main(["bench", "import-truth", "--work", str(fresh), "--truth", str(out / "truth.npz")]) == 0
    other = tmp_path / "other"
    assert main(["bench", "prepare", "--work", str(other), *prep, "--num-subsets", "6"]) == 0
    assert main(["bench", "import-truth", "--work", str(other), "--truth", str(out / "truth.npz")]) == 2
    assert not (other / "truth").exists()


def test_coupled_benchmark_trains_subset_models_coupled(tmp_path):
    """`bench prepare --coupled`: recorded in the config (older configs without the key still open) and every
    subset model replays the full-data run of its seed."""
    from attribution.cli import main
    from attribution.evaluation.setup import load_prepared

    prep = ["--num-train", "20", "--image-size", "8", "--num-subsets", "2", "--num-checkpoints", "1", "--epochs", "1",
            "--block-out-channels", "4", "8"]
    work = tmp_path / "coupled"
    assert main(["bench", "prepare", "--work", str(work), *prep, "--coupled"]) == 0
    assert json.loads((work / "config.json").read_text())["subset_coupled"] is True
    assert main(["bench", "retrain", "--work", str(work), "--limit", "2"]) == 0
    record = json.loads((work / "models" / "subset_000" / "train_config.json").read_text())
    _, _, _, subsets = load_prepared(work)
    assert record["coupled_subset"] == np.flatnonzero(subsets[0]).tolist()
    plain = tmp_path / "plain"
    assert main(["bench", "prepare", "--work", str(plain), *prep]) == 0
    assert "subset_coupled" not in json.loads((plain / "config.json").read_text())
    assert main(["bench", "prepare", "--work", str(plain), *prep, "--coupled"]) == 2  # other settings: refused


def test_bench_groups_design_end_to_end_with_common_draws(tmp_path):
    """prepare --design groups -> retrain (coupled, 2 seeds) -> lds with common random numbers: the group
    counterfactual section (Spearman, sign agreement, seed agreement) is written for every method."""
    from attribution.cli import main

    work = tmp_path / "groups"
    w = ["--work", str(work)]
    assert main(["bench", "prepare", *w, "--num-train", "20", "--image-size", "8", "--num-checkpoints", "2",
                 "--epochs", "1", "--block-out-channels", "4", "8", "--design", "groups", "--clusters-per-class", "1",
                 "--coupled"]) == 0
    assert main(["bench", "retrain", *w, "--replicates", "2"]) == 0
    q = ["--num-queries", "3", "--num-val-queries", "2", "--num-resamples", "2", "--proj-dim", "32",
         "--num-draws", "1", "--ridges", "0.1", "--draw-sharing", "common"]
    assert main(["bench", "lds", *w, *q, "--methods", "journey", "pixel", "--replicates", "2"]) == 0
    lds = json.loads((work / "lds.json").read_text())
    assert lds["num_subsets"] == 20 and lds["bench"]["subset_design"] == "groups"  # 10 classes + 10 clusters
    assert lds["featurize"]["draw_sharing"] == "common"
    assert any(p.name.endswith("-crn-sjlt32") for p in (work / "stores").iterdir())
    g = lds["groups"]
    assert g["num_groups"] == 20 and g["seeds"] == [0, 1] and len(g["seed_agreement"]) == 10
    for name in ("journey", "pixel"):
        m = g["methods"][name]
        assert len(m["spearman"]) == 10 and all(0 <= a <= 1 for a in m["sign_agreement"])
