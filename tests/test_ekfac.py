"""EK-FAC / K-FAC influence (attribution.scoring.ekfac): exact-Hessian equality, kronfluence agreement, sign, storage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

pytest.importorskip("kronfluence")

from attribution.scoring import ekfac  # noqa: E402
from attribution.config import FeaturizeConfig, QueryConfig, SamplingConfig  # noqa: E402
from attribution.data import ArrayDataset  # noqa: E402
from attribution.features import draw_timesteps_and_noise, featurize  # noqa: E402
from attribution.features import per_step_grads, select_params  # noqa: E402
from attribution.models import load_models  # noqa: E402
from attribution.features import METHODS, loss_output  # noqa: E402
from attribution.scoring import Scorer, query_noises  # noqa: E402
from attribution.features import StoreError  # noqa: E402
from attribution.sampling import sample_trajectory  # noqa: E402

RIDGE = 0.1
STEPS = [1, 3]


def make_micro_pipeline(directory: Path, seed: int, attention: bool = False) -> Path:
    """A 2.7k-parameter UNet2DModel (2, 4 channels, 8x8) small enough for an explicit (p, p) Gauss-Newton."""
    torch.manual_seed(seed)
    kw = dict(down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
              attention_head_dim=2) if attention else dict(down_block_types=("DownBlock2D",) * 2,
                                                           up_block_types=("UpBlock2D",) * 2, add_attention=False)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(2, 4), layers_per_block=1,
                       norm_num_groups=2, **kw)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    unet.save_pretrained(directory / "unet")
    DDPMScheduler(num_train_timesteps=100).save_pretrained(directory / "scheduler")
    (directory / "model_index.json").write_text(
        '{"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"], "scheduler": ["diffusers", "DDPMScheduler"]}'
    )
    return directory


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """Two micro checkpoints, 10 examples, an identity-projection loss store (2 draws) with fitted factors."""
    root = tmp_path_factory.mktemp("ekfac")
    models = load_models([make_micro_pipeline(root / f"m{s}", s) for s in (0, 1)])
    rng = np.random.default_rng(0)
    ds = ArrayDataset(rng.integers(0, 256, (10, 8, 8), dtype=np.uint8), labels=np.arange(10) % 2, name="micro")
    store = featurize(models, ds, root / "store", FeaturizeConfig(proj_kind="identity", num_draws=2, store_dtype="float32"))
    ekfac.fit_factors(store, models, ds, ekfac.EkfacConfig(batch_size=8, dtype="float64"))
    traj = sample_trajectory(models[0], SamplingConfig(num_inference_steps=5, seed=0))
    return {"root": root, "models": models, "ds": ds, "store": store, "traj": traj}


def _query_grads(model, params, traj, mask=None, k=3):
    noises = query_noises(STEPS, k, 0, tuple(traj.x0_hat.shape[1:]))
    ts = traj.timesteps[STEPS][:, None].expand(-1, k)
    return per_step_grads(model, params, loss_output, traj.x0_hat[STEPS], ts, noises, mask)  # (S, p)


def _train_grads(model, params, ds, cfg):
    idx = np.arange(len(ds))
    ts, noises = draw_timesteps_and_noise(idx, cfg, model.num_train_timesteps, model.image_shape)
    return per_step_grads(model, params, loss_output, ds.images(idx), ts, noises), ds.images(idx), ts, noises


def test_methods_registered():
    assert METHODS["ekfac"].combine == "ekfac" and METHODS["kfac"].combine == "kfac"
    assert METHODS["ekfac"].train_output == "loss"


def test_exact_gauss_newton_matches_per_pixel_autograd(micro):
    """exact_gauss_newton's jacrev equals (2/P) sum of per-output-pixel autograd outer products."""
    model = micro["models"][0]
    params = select_params(model)
    cfg = micro["store"].config
    _, x0, ts, noises = _train_grads(model, params, micro["ds"], cfg)
    x0, ts, noises = x0[:1], ts[:1, :1], noises[:1, :1]
    got = ekfac.exact_gauss_newton(model, params, x0, ts, noises)
    sel = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    from torch.func import functional_call

    ab = model.alphas_cumprod[ts[0]]
    x_t = ab.sqrt()[:, None, None, None] * x0 + (1 - ab).sqrt()[:, None, None, None] * noises[0]
    out = functional_call(model.unet, sel, (x_t, ts[0])).sample.reshape(-1)
    rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(out[j], list(sel.values()), retain_graph=True)])
            for j in range(out.numel())]
    J = torch.stack(rows).double()
    want = 2.0 / out.numel() * J.T @ J
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))  # float32 Jacobians


@pytest.mark.parametrize("masked", [False, True])
def test_exact_hessian_scores_equal_influence_formula(micro, masked):
    """With K-FAC replaced by the exact Gauss-Newton of the tracked modules, the Scorer's scores equal
    (1/M) sum_m (1/N) grad l_i^T (G_m + lambda_m I)^-1 grad f_s on the tracked parameters."""
    models, store, ds, traj = micro["models"], micro["store"], micro["ds"], micro["traj"]
    mask = torch.zeros(1, 8, 8)
    mask[:, 2:6, 1:5] = 1
    mask = mask if masked else None
    scorer = Scorer(store, models, "ekfac", QueryConfig(num_resamples=3, ridge=RIDGE))
    expected = np.zeros((len(STEPS), len(ds)))
    for m, model in enumerate(models):
        params = select_params(model)
        layout, untracked = ekfac.tracked_layout(model, params)
        assert untracked and all(".norm" in k or "norm_out" in k for k in untracked)  # GroupNorm only
        idx = ekfac.tracked_indices(layout)
        gi, x0, ts, noises = _train_grads(model, params, ds, store.config)
        G = ekfac.exact_gauss_newton(model, params, x0, ts, noises, idx)
        scorer.influence.preconditioners[m] = ekfac.DensePreconditioner(G, idx, RIDGE)
        lam = RIDGE * float(torch.trace(G)) / G.shape[0]
        gq = _query_grads(model, params, traj, mask)
        v = torch.linalg.solve(G + lam * torch.eye(G.shape[0], dtype=torch.float64), gq[:, idx].double().T)  # (q, S)
        expected += (gi[:, idx].double() @ v).T.numpy() / len(ds)
    expected /= len(models)
    got = scorer.score(traj, STEPS, mask).scores
    np.testing.assert_allclose(got, expected, rtol=2e-4, atol=1e-6 * np.abs(expected).max())


def test_ekfac_scores_equal_kronfluence_pairwise(micro, tmp_path):
    """Our preconditioning of the store's query with kronfluence's factors equals kronfluence's own pairwise scores
    (its per-example train gradients, its EK-FAC preconditioning, same damping), up to the 1/N and the draw mean."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import ScoreArguments
    from kronfluence.utils.dataset import DataLoaderKwargs

    models, store, ds, traj = micro["models"], micro["store"], micro["ds"], micro["traj"]
    model = models[0]
    ours = Scorer(store, models, "ekfac", QueryConfig(num_resamples=3, ridge=RIDGE))
    feats = ours.query_features(traj, STEPS)
    mine = (torch.from_numpy(store.features(0)[:]) @ feats[0].T).T.numpy()  # checkpoint 0 only, (S, N)
    shutil.copytree(ekfac.factors_dir(store), tmp_path / "f")
    manifest = json.loads((tmp_path / "f" / "manifest.json").read_text())
    task = ekfac.make_task(model, manifest["tracked_modules"])
    analyzer = Analyzer("ckpt0", prepare_model(__import__("copy").deepcopy(model.unet), task), task, cpu=True,
                        output_dir=str(tmp_path / "f"), disable_tqdm=True)
    analyzer.set_dataloader_kwargs(DataLoaderKwargs(num_workers=0))
    k = 3
    noises = query_noises(STEPS, k, 0, (1, 8, 8))
    ts = traj.timesteps[STEPS][:, None].expand(-1, k).contiguous()
    queries = torch.utils.data.TensorDataset(traj.x0_hat[STEPS], ts, noises, torch.ones(len(STEPS), 1, 8, 8))
    items = ekfac.DrawItems(model, ds, ds, np.arange(len(ds)), store.config)
    args = ScoreArguments(damping_factor=ours.influence.preconditioners[0].damping, score_dtype=torch.float64,
                          precondition_dtype=torch.float64, per_sample_gradient_dtype=torch.float64)
    analyzer.compute_pairwise_scores("s", "ekfac", queries, items, per_device_query_batch_size=2,
                                     per_device_train_batch_size=8, score_args=args)
    # kronfluence's "sample" is a row of the UNet batch: a query's K noised copies are K rows, each with the
    # gradient of (1/K) loss_k, so a step's score is the sum over its K rows; a train example's is the mean of its D draws.
    theirs = analyzer.load_pairwise_scores("s")["all_modules"].numpy()  # (S * K, N * D)
    assert theirs.shape == (len(STEPS) * k, len(ds) * store.config.num_draws)
    theirs = theirs.reshape(len(STEPS), k, len(ds), -1).sum(1).mean(2) / len(ds)
    np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=1e-7 * np.abs(theirs).max())


def test_kfac_and_ekfac_differ_but_agree_in_ranking(micro):
    q = QueryConfig(num_resamples=3, ridge=RIDGE)
    a = Scorer(micro["store"], micro["models"], "ekfac", q).score(micro["traj"], STEPS).scores
    b = Scorer(micro["store"], micro["models"], "kfac", q).score(micro["traj"], STEPS).scores
    assert not np.allclose(a, b)
    from scipy.stats import spearmanr

    assert min(spearmanr(a[s], b[s])[0] for s in range(len(STEPS))) > 0.5


def test_factors_resume_refuse_and_verify(micro, tmp_path):
    models, store, ds = micro["models"], micro["store"], micro["ds"]
    root = ekfac.factors_dir(store)
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["kronfluence_version"] and manifest["checkpoints"] == [m.checkpoint_hash for m in models]
    assert set(manifest["checkpoint_factors"]) == {"0", "1"}
    # Resumable: a finished fit is skipped; an unfinished checkpoint is refitted to the same factors.
    logs: list[str] = []
    ekfac.fit_factors(store, models, ds, ekfac.EkfacConfig(batch_size=8, dtype="float64"), log=logs.append)
    assert sum("skipping" in s for s in logs) == 2
    before = ekfac.load_factors(store, manifest, 1, "ekfac")
    saved = json.loads((root / "manifest.json").read_text())
    del saved["checkpoint_factors"]["1"]
    (root / "manifest.json").write_text(json.dumps(saved))
    lam = next((root / "ckpt1").rglob("lambda_matrix.safetensors"))
    lam.write_bytes(lam.read_bytes()[:100])  # a half-written stage file is deleted and recomputed
    with pytest.raises(ekfac.FactorError, match="unfinished"):
        Scorer(store, models, "ekfac")
    ekfac.fit_factors(store, models, ds, ekfac.EkfacConfig(batch_size=8, dtype="float64"))
    after = ekfac.load_factors(store, json.loads((root / "manifest.json").read_text()), 1, "ekfac")
    for name in before:
        torch.testing.assert_close(before[name]["eigenvalues"], after[name]["eigenvalues"])
    # Refused: other settings; a tampered file.
    with pytest.raises(ekfac.FactorError, match="settings differ"):
        ekfac.fit_factors(store, models, ds, ekfac.EkfacConfig(batch_size=8, dtype="float64", sample_seed=3))
    with pytest.raises(ekfac.FactorError, match="checkpoints differ"):
        ekfac.open_manifest(store, models[::-1])
    f = next((root / "ckpt0").rglob("activation_eigenvectors.safetensors"))
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    original = f.read_bytes()
    f.write_bytes(bytes(data))
    try:
        with pytest.raises(ekfac.FactorError, match="checksum"):
            Scorer(store, models, "ekfac")
    finally:
        f.write_bytes(original)


def test_missing_factors_and_wrong_store_are_refused(tmp_path, micro):
    models, ds = micro["models"], micro["ds"]
    store = featurize(models[:1], ds, tmp_path / "s", FeaturizeConfig(proj_dim=16, num_draws=1))
    with pytest.raises(ekfac.FactorError, match="fit-factors"):
        Scorer(store, models[:1], "ekfac")
    sq = featurize(models[:1], ds, tmp_path / "sq", FeaturizeConfig(output="square", proj_dim=16, num_draws=1))
    with pytest.raises(StoreError, match="loss"):
        ekfac.fit_factors(sq, models[:1], ds)


def test_projected_store_approximates_exact(micro, tmp_path):
    """With the default sjlt store, <phi_i, P v> estimates <grad l_i, v> within the sketch's error,
    sd = sqrt((|grad l_i|^2 |v|^2 + <grad l_i, v>^2) / d) (one Johnson-Lindenstrauss inner product)."""
    models, ds, traj = micro["models"][:1], micro["ds"], micro["traj"]
    store = featurize(models, ds, tmp_path / "sj", FeaturizeConfig(proj_dim=2048, num_draws=2, store_dtype="float32"))
    ekfac.fit_factors(store, models, ds, ekfac.EkfacConfig(batch_size=8, dtype="float64"))
    q = QueryConfig(num_resamples=3, ridge=RIDGE)
    sk = Scorer(store, models, "ekfac", q).score(traj, STEPS).scores
    exact_store = featurize(models, ds, tmp_path / "id", FeaturizeConfig(proj_kind="identity", num_draws=2,
                                                                           store_dtype="float32"))
    shutil.copytree(ekfac.factors_dir(store), ekfac.factors_dir(exact_store))
    man = json.loads((ekfac.factors_dir(exact_store) / "manifest.json").read_text())
    man["store_settings"] = exact_store.manifest["settings"]
    (ekfac.factors_dir(exact_store) / "manifest.json").write_text(json.dumps(man))
    exact = Scorer(exact_store, models, "ekfac", q)
    ex = exact.score(traj, STEPS).scores
    v = exact.influence.preconditioners[0](_query_grads(models[0], select_params(models[0]), traj)) / len(ds)  # (S, p)
    phi = torch.from_numpy(np.asarray(exact_store.features(0)))  # (N, p) exact train gradients
    sd = np.sqrt((np.outer(v.norm(dim=1) ** 2, phi.norm(dim=1) ** 2) + ex**2) / 2048)
    assert np.all(np.abs(sk - ex) < 5 * sd)
    assert np.abs(sk - ex).mean() < 1.5 * sd.mean()  # the typical error is one sd, not a bias


def test_diffusers_attention_unet_compatible(tmp_path):
    """kronfluence wraps the Linear layers of diffusers' attention blocks (to_q/k/v/out) and fits them."""
    models = load_models([make_micro_pipeline(tmp_path / "a", 0, attention=True)])
    rng = np.random.default_rng(1)
    ds = ArrayDataset(rng.integers(0, 256, (6, 8, 8), dtype=np.uint8), name="attn")
    store = featurize(models, ds, tmp_path / "s", FeaturizeConfig(proj_dim=64, num_draws=2))
    man = ekfac.fit_factors(store, models, ds, ekfac.EkfacConfig(batch_size=6))
    assert any(name.endswith("to_q") for name in man["tracked_modules"])
    traj = sample_trajectory(models[0], SamplingConfig(num_inference_steps=3, seed=0))
    scores = Scorer(store, models, "ekfac", QueryConfig(num_resamples=2)).score(traj, [2]).scores
    assert scores.shape == (1, 6) and np.isfinite(scores).all() and np.abs(scores).max() > 0


def test_latent_conditional_model(latent_dirs, caption_folder, tmp_path):
    """A Stable-Diffusion-layout UNet2DConditionModel: factors fit on caption-conditioned latents, a prompt query scores."""
    from attribution.data import load_dataset
    from attribution.models import load_model

    model = load_model(latent_dirs["a"])
    ds = load_dataset(str(caption_folder), model.pixel_shape)
    store = featurize([model], ds, tmp_path / "s", FeaturizeConfig(proj_dim=64, num_draws=1))
    man = ekfac.fit_factors(store, [model], ds, ekfac.EkfacConfig(batch_size=4))
    assert any("attn2.to_k" in n for n in man["tracked_modules"])  # cross-attention on the text embedding
    traj = sample_trajectory(model, SamplingConfig(num_inference_steps=2, seed=0, prompt="a red square"))
    scores = Scorer(store, [model], "ekfac", QueryConfig(num_resamples=2)).score(traj, [1]).scores
    assert scores.shape == (1, len(ds)) and np.isfinite(scores).all()


def _pbrf_response(model, params, x0, ts, noises, drop: int, damping: float, steps: int = 300, lr: float = 0.05):
    """Parameters after removing example ``drop``, by the proximal Bregman response (Bae et al. 2022), the
    counterfactual influence functions estimate at a trained or untrained point theta_s:

        argmin_theta (1/(N D)) sum_{j,d} mean_px (eps_theta - eps_theta_s)^2 - (1/N) l_drop(theta) + (lambda/2) |theta - theta_s|^2

    (the Gauss-Newton's Bregman term; l_drop the example's draw-averaged loss), by gradient descent."""
    from torch.func import functional_call

    n, d = ts.shape
    abar = model.alphas_cumprod
    t = ts.reshape(-1)
    ab = abar[t][:, None, None, None]
    x_t = ab.sqrt() * x0.repeat_interleave(d, 0) + (1 - ab).sqrt() * noises.flatten(0, 1)
    with torch.no_grad():
        ref = model.unet(x_t, t).sample
    theta0 = {k: v.detach().clone() for k, v in params.items()}
    theta = {k: v.clone().requires_grad_(True) for k, v in theta0.items()}
    opt = torch.optim.Adam(list(theta.values()), lr=lr * 0.01)
    rows = slice(drop * d, (drop + 1) * d)
    for _ in range(steps):
        opt.zero_grad()
        pred = functional_call(model.unet, theta, (x_t, t)).sample
        bregman = ((pred - ref) ** 2).flatten(1).mean(1).mean()
        removed = loss_output(pred[rows], noises[drop]).mean() / n
        prox = sum(((theta[k] - theta0[k]) ** 2).sum() for k in theta) * damping / 2
        (bregman - removed + prox).backward()
        opt.step()
    return {k: v.detach() for k, v in theta.items()}


def test_sign_removing_top_raises_f_more_than_removing_bottom(micro):
    """Sign convention against the counterfactual influence functions estimate: removing the top-scored example
    (its proximal Bregman response, :func:`_pbrf_response`, no chaotic retraining) raises f_t more than removing
    the bottom-scored one, and raises it, in most (query, step) pairs. Full retraining on a tiny set is
    within its own noise (benchmarks/bench_ekfac.py --parts sign: 58 % of 24 pairs; journey-TRAK 62 %)."""
    from torch.func import functional_call

    models, store, ds = micro["models"], micro["store"], micro["ds"]
    model = models[0]
    params = select_params(model)
    scorer = Scorer(store, models, "ekfac", QueryConfig(num_resamples=8, ridge=1.0))
    damping = scorer.influence.preconditioners[0].damping
    _, x0, ts, noises = _train_grads(model, params, ds, store.config)
    phi = torch.from_numpy(np.asarray(store.features(0)))
    responses: dict[int, dict] = {}
    wins, rises = [], []
    for seed in range(3):
        traj = sample_trajectory(model, SamplingConfig(num_inference_steps=5, seed=seed))
        feats = scorer.query_features(traj, STEPS)[0]  # checkpoint 0: (S, p)
        scores = (phi @ feats.T).T.numpy()
        for j, step in enumerate(STEPS):
            nz = query_noises([step], 8, 0, model.image_shape)[0]
            t = traj.timesteps[[step]].expand(8)
            ab = model.alphas_cumprod[t][:, None, None, None]
            x = ab.sqrt() * traj.x0_hat[step][None] + (1 - ab).sqrt() * nz

            def f(theta):
                with torch.no_grad():
                    return float(loss_output(functional_call(model.unet, theta, (x, t)).sample, nz).mean())

            top, bottom = int(scores[j].argmax()), int(scores[j].argmin())
            for i in (top, bottom):
                if i not in responses:
                    responses[i] = _pbrf_response(model, params, x0, ts, noises, i, damping)
            base = f(params)
            wins.append(f(responses[top]) > f(responses[bottom]))
            rises.append(f(responses[top]) > base)
    assert np.mean(wins) >= 5 / 6 and np.mean(rises) >= 5 / 6, (wins, rises)


def test_cli_fit_factors_then_attribute(tmp_path, micro, monkeypatch):
    """`attribution fit-factors` then `attribute --method ekfac|kfac` on a store built by `featurize`."""
    from attribution.cli import main

    ds = micro["ds"]
    npz = tmp_path / "d.npz"
    np.savez(npz, images=((ds.images(np.arange(len(ds)))[:, 0] + 1) * 127.5).round().numpy().astype(np.uint8))
    model_dir = str(micro["models"][0].path)
    monkeypatch.chdir(tmp_path)
    store = Path("store")  # relative, as typed (kronfluence writes under an absolute path)
    assert main(["featurize", "--model", model_dir, "--data", str(npz), "--store", str(store), "--proj-dim", "32",
                 "--num-draws", "1", "--device", "cpu"]) == 0
    assert main(["fit-factors", "--store", str(store), "--data", str(npz), "--batch-size", "8", "--device", "cpu"]) == 0
    assert (store / "ekfac" / "manifest.json").exists()
    for method in ("ekfac", "kfac"):
        out = tmp_path / f"{method}.npz"
        assert main(["attribute", "--store", str(store), "--seed", "0", "--num-steps", "3", "--steps", "2",
                     "--num-resamples", "2", "--method", method, "--device", "cpu", "--out", str(out)]) == 0
        got = np.load(out)
        assert got["scores"].shape == (1, len(ds)) and str(got["method"]) == method
