"""Every training objective (epsilon, v, sample prediction, flow matching) against brute force on tiny models.

The loss, x_t, x0_hat and the sampler steps are written out here by hand from the
papers' formulas (not through attribution.models.objective), on tiny random
UNet2DModel pixel models and tiny SD-layout latent models with a prompt.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.func import functional_call
from trak_checks import assert_self_attribution, explicit_scores

from attribution.config import FeaturizeConfig, QueryConfig, SamplingConfig
from attribution.features import (
    Store,
    StoreError,
    draw_timesteps_and_noise,
    featurize,
    get_output,
    looped_grads,
    per_example_grads,
    select_params,
    store_spec,
)
from attribution.models import load_model
from attribution.sampling import invert_image, sample_trajectory
from attribution.scoring import Scorer

KINDS = ("epsilon", "v_prediction", "sample", "flow")
SHIFT = 3.0  # the flow models' sigma shift (conftest.make_tiny_pipeline)
SMALL_PARAMS = ("conv_in", "conv_out")  # 77 parameters > 24 examples: identity projection, invertible Phi Phi^T
LATENT_PARAMS = ("conv_out", r"re:^down_blocks\.0\..*attn2\.to_k\.")  # 548 parameters


# ---------------------------------------------------------------------- the formulas, by hand
def hand_schedule(model, kind: str, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(a_t, b_t, network timestep input) of integer timesteps t, from the scheduler's definition."""
    T = int(model.scheduler.config.num_train_timesteps)
    if kind == "flow":
        u = (t.double() + 1) / T  # the unshifted training grid 1/T .. 1
        sigma = (SHIFT * u / (1 + (SHIFT - 1) * u)).float()
        return 1 - sigma, sigma, sigma * T
    betas = torch.as_tensor(model.scheduler.betas, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)[t].float()
    return abar.sqrt(), (1 - abar).sqrt(), t


def hand_target(kind: str, x0: torch.Tensor, eps: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.view(-1, 1, 1, 1), b.view(-1, 1, 1, 1)
    return {"epsilon": eps, "v_prediction": a * eps - b * x0, "sample": x0 + 0 * eps, "flow": eps - x0}[kind]


def hand_x0_hat(kind: str, x_t: torch.Tensor, pred: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.view(-1, 1, 1, 1), b.view(-1, 1, 1, 1)
    return {"epsilon": (x_t - b * pred) / a, "v_prediction": a * x_t - b * pred, "sample": pred,
            "flow": x_t - b * pred}[kind]


def hand_losses(model, kind: str, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, params=None) -> torch.Tensor:
    """(D,) training losses ||y_t - model(a_t x0 + b_t eps, tau(t))||^2 of one example x0 (C, H, W) at its draws
    t (D,), eps (D, C, H, W); ``params``: parameters to call the network with (None: its own)."""
    a, b, tau = hand_schedule(model, kind, t)
    x_t = a.view(-1, 1, 1, 1) * x0 + b.view(-1, 1, 1, 1) * eps
    net = model.unet if params is None else (lambda *args: functional_call(model.unet, params, args, strict=False))
    pred = net(x_t, tau).sample
    return ((hand_target(kind, x0[None], eps, a, b) - pred) ** 2).flatten(1).mean(1)


def kind_of(model) -> str:
    return model.objective.kind.value


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def pixel_models(tmp_path_factory) -> dict:
    from conftest import make_tiny_pipeline

    root = tmp_path_factory.mktemp("objectives")
    return {k: load_model(make_tiny_pipeline(root / k, 0, prediction=k, shift=SHIFT)) for k in KINDS}


@pytest.fixture(scope="session")
def latent_models(tmp_path_factory) -> dict:
    pytest.importorskip("transformers")
    from latent_builders import make_tiny_latent_pipeline

    root = tmp_path_factory.mktemp("latent_objectives")
    return {k: load_model(make_tiny_latent_pipeline(root / k, prediction=k)) for k in ("v_prediction", "flow")}


@pytest.fixture(scope="session")
def latent_train(caption_folder, latent_models):
    from latent_builders import CAPTIONS

    from attribution.data import image_folder_dataset
    from attribution.features import encode_dataset

    model = latent_models["v_prediction"]  # both kinds share the VAE
    return encode_dataset(image_folder_dataset(caption_folder, model.pixel_shape), model), CAPTIONS


def _images(ds) -> torch.Tensor:
    return ds.images(range(len(ds)))


# ---------------------------------------------------------------------- loading and the loss
def test_objectives_are_read_from_the_scheduler(pixel_models, latent_models):
    for kind, model in {**pixel_models, **{f"latent-{k}": m for k, m in latent_models.items()}}.items():
        assert kind.endswith(kind_of(model))
    flow = pixel_models["flow"].objective
    t = torch.arange(100)
    a, b, tau = hand_schedule(pixel_models["flow"], "flow", t)
    torch.testing.assert_close(flow.coefficients(t)[1], b)  # sigma grid with the shift, sigma_{T-1} = 1
    torch.testing.assert_close(flow.model_timesteps(t), tau)
    assert float(b[-1]) == pytest.approx(1.0) and len({m.objective.identity["schedule_sha256"] for m in pixel_models.values()}) == 4


@pytest.mark.parametrize("kind", KINDS)
def test_loss_is_the_models_training_loss(pixel_models, tiny_dataset, kind):
    """The gradient rows are those of the model's own training loss ||y_t - model(a_t x0 + b_t eps, tau(t))||^2."""
    model = pixel_models[kind]
    params = select_params(model, SMALL_PARAMS)
    x0 = _images(tiny_dataset)[:3]
    ts, noises = draw_timesteps_and_noise(np.arange(3), FeaturizeConfig(num_draws=4), 100, model.image_shape)
    got = looped_grads(model, params, get_output("loss"), x0, ts, noises)
    for i in range(3):
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        loss = hand_losses(model, kind, x0[i], ts[i], noises[i], leaves).mean()
        want = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(leaves.values()))])
        torch.testing.assert_close(got[i], want, rtol=1e-3, atol=1e-5 * float(want.abs().max()))  # abar in float64 here


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("output", ["loss", "square"])
def test_vmap_grads_equal_looped_autograd(pixel_models, tiny_dataset, kind, output):
    model = pixel_models[kind]
    params = select_params(model)
    x0 = _images(tiny_dataset)[:4]
    ts, noises = draw_timesteps_and_noise(np.arange(4), FeaturizeConfig(num_draws=3), 100, model.image_shape)
    mask = torch.zeros(1, 8, 8)
    mask[:, 2:6, 1:5] = 1
    fast = per_example_grads(model, params, get_output(output), x0, ts, noises, mask, chunk_size=2)
    slow = looped_grads(model, params, get_output(output), x0, ts, noises, mask)
    assert slow.abs().max() > 0
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5 * float(slow.abs().max()))


@pytest.mark.parametrize("kind", ["v_prediction", "flow"])
def test_latent_vmap_grads_equal_looped_autograd(latent_models, latent_train, kind):
    model = latent_models[kind]
    data, captions = latent_train
    params = select_params(model, LATENT_PARAMS)
    ts, noises = draw_timesteps_and_noise(np.arange(3), FeaturizeConfig(num_draws=2), 100, model.image_shape)
    cond = model.encode_prompts(captions[:3])
    fast = per_example_grads(model, params, get_output("loss"), data.latents[:3], ts, noises, chunk_size=2, cond=cond)
    slow = looped_grads(model, params, get_output("loss"), data.latents[:3], ts, noises, cond=cond)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5 * float(slow.abs().max()))


# ---------------------------------------------------------------------- scores
def _identity_store(models, dataset, root, params):
    cfg = FeaturizeConfig(proj_kind="identity", num_draws=2, param_filter=params, store_dtype="float32")
    return featurize(models, dataset, root, cfg), cfg


@pytest.mark.parametrize("kind", KINDS)
def test_identity_projection_scores_equal_explicit_solve_and_self_attribution(pixel_models, tiny_dataset, tmp_path, kind):
    model = pixel_models[kind]
    store, cfg = _identity_store([model], tiny_dataset, tmp_path / "s", SMALL_PARAMS)
    assert store.manifest["objective"] == model.objective.identity
    traj = sample_trajectory(model, SamplingConfig(num_inference_steps=6, seed=1))
    query = QueryConfig(num_resamples=4, ridge=1e-2)
    mask = np.zeros((8, 8))
    mask[1:6, 2:7] = 1
    got = Scorer(store, [model], "journey", query).score(traj, [0, 3, 5], mask=mask).scores
    want = explicit_scores([model], _images(tiny_dataset), cfg, traj, [0, 3, 5], query,
                           torch.as_tensor(mask, dtype=torch.float32)[None])
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())
    assert_self_attribution(Scorer(store, [model], "journey", QueryConfig(ridge=1e-6)), cfg, _images(tiny_dataset))


@pytest.mark.parametrize("kind", ["v_prediction", "flow"])
def test_latent_scores_equal_explicit_solve_and_self_attribution(latent_models, latent_train, caption_folder, tmp_path, kind):
    from attribution.data import image_folder_dataset
    from attribution.scoring import downsample_mask

    model = latent_models[kind]
    data, captions = latent_train
    store, cfg = _identity_store([model], image_folder_dataset(caption_folder, model.pixel_shape), tmp_path / "s",
                                 LATENT_PARAMS)
    traj = sample_trajectory(model, SamplingConfig(num_inference_steps=5, seed=1, prompt="a blue circle", guidance_scale=2.0))
    query = QueryConfig(num_resamples=3, ridge=1e-1)
    pixel_mask = np.zeros((16, 16))
    pixel_mask[4:12, 2:10] = 1
    got = Scorer(store, [model], "journey", query).score(traj, [0, 2, 4], mask=pixel_mask).scores
    latent_mask = downsample_mask(torch.as_tensor(pixel_mask, dtype=torch.float32)[None], (8, 8))
    want = explicit_scores([model], data.latents, cfg, traj, [0, 2, 4], query, latent_mask, captions=captions)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())
    assert_self_attribution(Scorer(store, [model], "journey", QueryConfig(ridge=1e-6)), cfg, data.latents, captions)


def test_store_of_another_objective_is_refused(pixel_models, tiny_dataset, tmp_path):
    cfg = FeaturizeConfig(proj_dim=16, num_draws=1)
    featurize([pixel_models["epsilon"]], tiny_dataset, tmp_path / "s", cfg)
    for kind in ("v_prediction", "flow"):
        other = pixel_models[kind]
        with pytest.raises(StoreError, match=f"training objective differs: the store was built for a 'epsilon' model, the model is '{kind}'"):
            Store.open(tmp_path / "s", store_spec([other], tiny_dataset, cfg))
        with pytest.raises(StoreError, match="training objective differs"):
            Scorer(Store.open(tmp_path / "s"), [other])
    with pytest.raises(ValueError, match="different training objectives"):
        store_spec([pixel_models["epsilon"], pixel_models["v_prediction"]], tiny_dataset, cfg)


# ---------------------------------------------------------------------- sampling and inversion
def _check_trajectory(model, traj, cond=None) -> None:
    """x0_hat of every step obeys the family's formula at the recomputed prediction, and x_t = a x0_hat + b eps."""
    kind = kind_of(model)
    a, b, tau = hand_schedule(model, kind, traj.timesteps)
    kwargs = {} if cond is None else model.unet_kwargs(cond.expand(len(tau)))
    with torch.no_grad():
        pred = model.unet(traj.x_t, tau, **kwargs).sample
    if cond is None:  # (guided latent trajectories: the guided prediction is not recomputed here)
        torch.testing.assert_close(traj.x0_hat, hand_x0_hat(kind, traj.x_t, pred, a, b), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a.view(-1, 1, 1, 1) * traj.x0_hat + b.view(-1, 1, 1, 1) * traj.eps, traj.x_t,
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_trajectory_is_reproducible_and_obeys_the_family(pixel_models, kind):
    model = pixel_models[kind]
    for sched in ("ddim", "ddpm"):
        cfg = SamplingConfig(num_inference_steps=7, seed=5, scheduler=sched)
        a, b = sample_trajectory(model, cfg), sample_trajectory(model, cfg)
        assert torch.equal(a.x_t, b.x_t) and torch.equal(a.sample, b.sample)
        assert a.timesteps[0] > a.timesteps[-1]
        _check_trajectory(model, a)
    assert not torch.equal(sample_trajectory(model, SamplingConfig(num_inference_steps=7, seed=6)).x_t[0], a.x_t[0])
    if kind == "flow":  # Euler to sigma = 0: the sample is the last step's x0_hat
        ode = sample_trajectory(model, SamplingConfig(num_inference_steps=7, seed=5))
        assert ode.timesteps[0] == 99 and ode.timesteps[-1] == 0
        torch.testing.assert_close(ode.sample, ode.x0_hat[-1].clamp(-1, 1))


@pytest.mark.parametrize("kind", ["v_prediction", "flow"])
def test_latent_trajectory_obeys_the_family(latent_models, kind):
    model = latent_models[kind]
    traj = sample_trajectory(model, SamplingConfig(num_inference_steps=4, seed=2, prompt="a red circle"))
    _check_trajectory(model, traj, traj.cond)


def _step_errors(model, traj, image: torch.Tensor) -> torch.Tensor:
    """max |deterministic step from x_t - next recorded state| per step: x' = a' x0_hat + b' eps_hat with the
    next level's coefficients (DDIM, eta 0; the flow Euler step x + (sigma' - sigma) v is the same map)."""
    a, b, _ = hand_schedule(model, kind_of(model), traj.timesteps)
    a_next = torch.cat([a[1:], torch.ones(1)]).view(-1, 1, 1, 1)  # the last step lands on abar = 1 / sigma = 0
    b_next = torch.cat([b[1:], torch.zeros(1)]).view(-1, 1, 1, 1)
    landed = a_next * traj.x0_hat + b_next * traj.eps
    return (landed - torch.cat([traj.x_t[1:], image[None]])).abs().amax(dim=(1, 2, 3))


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "flow"])  # sample prediction: see sampling/inversion.py
def test_refined_inversion_is_a_fixed_point_of_the_sampler(pixel_models, tiny_dataset, kind):
    model, image = pixel_models[kind], tiny_dataset.images([3])[0]
    plain = invert_image(model, image, num_inference_steps=6, refine_iters=0)
    refined = invert_image(model, image, num_inference_steps=6, refine_iters=8)
    assert torch.equal(refined.sample, image)
    e_plain, e_refined = _step_errors(model, plain, image), _step_errors(model, refined, image)
    assert e_refined.max() < 1e-3 * max(1.0, e_plain.max().item())
    assert e_plain.max() > 10 * e_refined.max()
    _check_trajectory(model, refined)


# ---------------------------------------------------------------------- the command line
@pytest.mark.parametrize("kind", ["v_prediction", "flow"])
def test_cli_featurize_and_attribute_record_the_objective(pixel_models, tiny_dataset, tmp_path, kind):
    from attribution.cli import main

    npz = tmp_path / "d.npz"
    np.savez(npz, images=tiny_dataset.array)
    model = pixel_models[kind]
    store = tmp_path / "store"
    assert main(["featurize", "--model", str(model.path), "--data", str(npz), "--store", str(store), "--proj-dim", "16",
                 "--num-draws", "1", "--device", "cpu"]) == 0
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["objective"] == model.objective.identity and manifest["objective"]["kind"] == kind
    out = tmp_path / "o.npz"
    assert main(["attribute", "--store", str(store), "--seed", "0", "--num-steps", "4", "--steps", "0,3",
                 "--num-resamples", "2", "--device", "cpu", "--out", str(out)]) == 0
    with np.load(out) as z:
        assert z["scores"].shape == (2, len(tiny_dataset)) and np.isfinite(z["scores"]).all()


@pytest.mark.parametrize("kind", ["v_prediction", "flow"])
def test_cli_trains_a_model_of_each_objective(tiny_dataset, tmp_path, kind):
    """`attribution train --prediction` saves a pipeline whose scheduler carries the objective it was trained with."""
    from attribution.cli import main

    npz = tmp_path / "d.npz"
    np.savez(npz, images=tiny_dataset.array)
    out = tmp_path / "m"
    assert main(["train", "--data", str(npz), "--out", str(out), "--epochs", "1", "--block-out-channels", "4", "8",
                 "--size", "8", "--channels", "1", "--prediction", kind, "--shift", "2.0"]) == 0
    model = load_model(out)
    assert kind_of(model) == kind and json.loads((out / "train_config.json").read_text())["prediction"] == kind
    if kind == "flow":
        assert model.objective.shift == 2.0


@torch.no_grad()
def _hand_losses(model, kind: str, x0: torch.Tensor, ts: torch.Tensor, noises: torch.Tensor) -> torch.Tensor:
    """(B, D) per-draw training losses, by hand: x0 (B, C, H, W), ts (B, D), noises (B, D, C, H, W)."""
    return torch.stack([hand_losses(model, kind, x0[i], ts[i], noises[i]) for i in range(len(x0))])


@pytest.mark.parametrize("kind", KINDS)
def test_influence_task_and_das_residuals_use_the_objective(pixel_models, tiny_dataset, tmp_path, kind):
    """The kronfluence task's train loss and measurement (EK-FAC) and the DAS residuals are the model's own loss."""
    pytest.importorskip("kronfluence")
    from attribution.scoring import ekfac
    from attribution.scoring.das import residual_errors

    model = pixel_models[kind]
    x0 = _images(tiny_dataset)[:3]
    ts, noises = draw_timesteps_and_noise(np.arange(3), FeaturizeConfig(num_draws=2), 100, model.image_shape)
    want = _hand_losses(model, kind, x0, ts, noises)  # (3, 2)
    task = ekfac.make_task(model, [])
    with torch.no_grad():
        train = task.compute_train_loss((x0, ts[:, 0], noises[:, 0], torch.zeros(3, 3, dtype=torch.long)), model.unet)
        measured = task.compute_measurement((x0, ts, noises, torch.ones(3, 1, 8, 8)), model.unet)
    torch.testing.assert_close(train, want[:, 0].sum(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(measured, want.mean(1).sum(), rtol=1e-4, atol=1e-6)
    cfg = FeaturizeConfig(proj_dim=16, num_draws=2)
    store = featurize([model], tiny_dataset, tmp_path / "s", cfg)
    ts_all, noises_all = draw_timesteps_and_noise(np.arange(len(tiny_dataset)), cfg, 100, model.image_shape)
    r = residual_errors(model, tiny_dataset, store)
    want_r = _hand_losses(model, kind, _images(tiny_dataset), ts_all, noises_all).mean(1).sqrt().numpy()
    np.testing.assert_allclose(r, want_r, rtol=1e-4)


# ---------------------------------------------------------------------- dynamic shifting (FLUX's scheduler)
FLUX_CONFIG = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                   base_image_seq_len=256, max_image_seq_len=4096)


@pytest.mark.parametrize("seq_len", [16, 256, 1024, 4096])
def test_dynamic_shift_grid_is_the_schedulers_set_timesteps_with_mu(seq_len):
    """sigma_t = e^mu / (e^mu + 1 / s_t - 1) over the unshifted grid, mu = calculate_shift(tokens): what
    FlowMatchEulerDiscreteScheduler.set_timesteps(T, mu=mu) gives (sigmas and timesteps)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from attribution.models.objective import DiffusionObjective

    sched = FlowMatchEulerDiscreteScheduler(**FLUX_CONFIG)
    obj = DiffusionObjective.from_scheduler(sched, image_seq_len=seq_len)
    mu = calculate_shift(seq_len, 256, 4096, 0.5, 1.15)
    assert obj.mu == pytest.approx(mu) and obj.kind.is_flow and f"dynamic shift mu {mu:.4g}" in obj.describe()
    ref = FlowMatchEulerDiscreteScheduler(**FLUX_CONFIG)
    ref.set_timesteps(1000, mu=mu)
    torch.testing.assert_close(obj.table.flip(0), ref.sigmas[:-1])
    torch.testing.assert_close(obj.model_time.flip(0), ref.timesteps)
    a, b = obj.coefficients(torch.tensor([0, 999]))
    torch.testing.assert_close(b, ref.sigmas[[999, 0]])
    torch.testing.assert_close(a, 1 - b)
    other = DiffusionObjective.from_scheduler(sched, image_seq_len=seq_len * 2)
    assert other.identity["schedule_sha256"] != obj.identity["schedule_sha256"]  # a store records the resolution


def test_dynamic_shift_and_other_grids_are_refused_where_not_implemented():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from attribution.models.objective import DiffusionObjective, unsupported_reason

    sched = FlowMatchEulerDiscreteScheduler(**FLUX_CONFIG)
    with pytest.raises(ValueError, match="use_dynamic_shifting=True is not implemented"):
        DiffusionObjective.from_scheduler(sched)  # no image sequence length: only FLUX supplies one
    config = {"_class_name": "FlowMatchEulerDiscreteScheduler", **FLUX_CONFIG}
    assert unsupported_reason(config, dynamic_shifting=True) is None
    assert "time_shift_type='linear' is not implemented" in unsupported_reason({**config, "time_shift_type": "linear"},
                                                                                 dynamic_shifting=True)
    assert "shift_terminal=0.02 is not implemented" in unsupported_reason({**config, "shift_terminal": 0.02},
                                                                           dynamic_shifting=True)
    # a fixed grid's objective is unchanged by the new options: no mu, no guidance in its identity
    fixed = DiffusionObjective.from_scheduler(FlowMatchEulerDiscreteScheduler(num_train_timesteps=100, shift=3.0),
                                              image_seq_len=16)
    assert fixed.mu is None and set(fixed.identity) == {"kind", "schedule_sha256"} and fixed.describe() == \
        "flow (flow matching, shift 3, T = 100)"
