"""The SDXL, DiT, SD3 and FLUX families on tiny random pipelines (tests/family_builders.py).

Per family, the invariants of tests/test_latent.py with the family's conditioning
(SDXL: two text encoders, pooled embeddings, time ids; DiT: class labels from the
image folder's subfolders, learned variance dropped; SD3: CLIP x2 + T5, flow matching;
FLUX: CLIP pooled + T5, packed latents, guidance embedding, dynamic shifting): vmapped = looped gradients
without an unannounced vmap fallback, identity projection = explicit TRAK solve with a
mask and a prompt or class, trajectories reproducible from a seed with guidance,
stores refused for another text encoder or transformer, LoRA gradients = the
adapter's columns of the full gradients, self-attribution, and the app. Also the
refusal of unsupported pipeline layouts.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from family_builders import (  # noqa: E402
    FLUX_SCALING_FACTOR, FLUX_SHIFT_FACTOR, ID2LABEL, dit_transformer, make_tiny_dit_pipeline, make_tiny_flux_pipeline,
    make_tiny_sd3_pipeline, make_tiny_sdxl_pipeline, sd3_transformer, tiny_t5, tiny_text_encoder_2, write_class_folder,
)
from latent_builders import CAPTIONS, write_model_index  # noqa: E402
from test_app import make_app  # noqa: E402
from test_latent import RIDGE  # noqa: E402
from trak_checks import assert_self_attribution, explicit_scores  # noqa: E402

from attribution.config import FeaturizeConfig, QueryConfig, SamplingConfig  # noqa: E402
from attribution.data import image_folder_dataset  # noqa: E402
from attribution.features import (  # noqa: E402
    Store, StoreError, draw_timesteps_and_noise, encode_dataset, example_prompts, featurize, get_output,
    looped_grads, per_example_grads, select_params, store_spec,
)
from attribution.models import ModelLoadError, add_lora, load_lora, load_model, lora_param_filter  # noqa: E402
from attribution.models.conditioning import Conditioning  # noqa: E402
from attribution.sampling import StepSampler, guided_eps, sample_trajectory  # noqa: E402
from attribution.scoring import Scorer, downsample_mask  # noqa: E402


@dataclass
class Family:
    """One family's tiny pipeline, a variant differing in one component, its data and query prompt."""

    name: str
    model_dir: Path
    other_dir: Path  # the same pipeline with another `other_component`
    other_component: str
    data_dir: Path
    prompt: str  # a text, or a class name
    other_prompt: str
    small_params: tuple[str, ...]  # small enough for the identity projection (p > N = 8 or 9)

    def model(self):
        return load_model(self.model_dir)

    def dataset(self, model):
        return image_folder_dataset(self.data_dir, model.pixel_shape)


@pytest.fixture(scope="session")
def families(tmp_path_factory, caption_folder) -> dict[str, Family]:
    root = tmp_path_factory.mktemp("families")
    sdxl = make_tiny_sdxl_pipeline(root / "sdxl")
    shutil.copytree(sdxl, root / "sdxl_other")
    shutil.rmtree(root / "sdxl_other" / "text_encoder_2")
    tiny_text_encoder_2(22).save_pretrained(root / "sdxl_other" / "text_encoder_2")
    dit = make_tiny_dit_pipeline(root / "dit")
    shutil.copytree(dit, root / "dit_other")
    shutil.rmtree(root / "dit_other" / "transformer")
    dit_transformer(1).save_pretrained(root / "dit_other" / "transformer")
    sd3 = make_tiny_sd3_pipeline(root / "sd3")
    shutil.copytree(sd3, root / "sd3_other")
    shutil.rmtree(root / "sd3_other" / "text_encoder_3")
    tiny_t5(24).save_pretrained(root / "sd3_other" / "text_encoder_3")
    flux = make_tiny_flux_pipeline(root / "flux")
    shutil.copytree(flux, root / "flux_other")
    shutil.rmtree(root / "flux_other" / "text_encoder_2")
    tiny_t5(24).save_pretrained(root / "flux_other" / "text_encoder_2")
    return {
        "sdxl": Family("sdxl", sdxl, root / "sdxl_other", "text_encoder_2", caption_folder, "a blue circle",
                       "green stripes", ("conv_out", "add_embedding.linear_1.bias", r"re:^down_blocks\.1\..*attn2\.to_k\.")),
        "dit": Family("dit", dit, root / "dit_other", "transformer", write_class_folder(root / "classes"),
                      "blue circle", "yellow cross",
                      ("proj_out_2", r"re:transformer_blocks\.0\.norm1\.linear\.bias", r"re:transformer_blocks\.0\.attn1\.to_k\.")),
        "sd3": Family("sd3", sd3, root / "sd3_other", "text_encoder_3", caption_folder, "a blue circle", "green stripes",
                      ("proj_out.bias", r"re:transformer_blocks\.0\.norm1\.linear\.bias",
                       r"re:transformer_blocks\.1\.attn\.to_k\.bias", "time_text_embed.text_embedder.linear_1.bias")),
        "flux": Family("flux", flux, root / "flux_other", "text_encoder_2", caption_folder, "a blue circle",
                       "green stripes",
                       ("proj_out.bias", r"re:^transformer_blocks\.0\.norm1\.linear\.bias",
                        r"re:single_transformer_blocks\.0\.attn\.to_k\.bias", "time_text_embed.guidance_embedder.linear_1.bias")),
    }


@pytest.fixture(scope="session", params=["sdxl", "dit", "sd3", "flux"])
def family(request, families) -> Family:
    return families[request.param]


@pytest.fixture(scope="session")
def loaded(family):
    """(model, image dataset, its latents, the training examples' prompts) of a family."""
    model = family.model()
    data = family.dataset(model)
    latents = encode_dataset(data, model)
    return model, data, latents, example_prompts(model, data, np.arange(len(data)))


@pytest.fixture(scope="session")
def identity_store(family, loaded, tmp_path_factory):
    model, data, _, _ = loaded
    cfg = FeaturizeConfig(proj_kind="identity", num_draws=2, param_filter=family.small_params, store_dtype="float32")
    return featurize([model], data, tmp_path_factory.mktemp(f"stores_{family.name}") / "identity", cfg), cfg


# ---------------------------------------------------------------------- loading and conditioning
def test_sdxl_conditioning_is_the_pipelines(families):
    m = families["sdxl"].model()
    assert type(m).__name__ == "SDXLModel" and m.is_latent and m.is_conditional and not m.is_class_conditional
    c = m.encode_prompts(["a red square", ""])
    assert c.text.shape == (2, 8, 64) and c.pooled.shape == (2, 16)
    assert c.time_ids.tolist() == [[16, 16, 0, 0, 16, 16]] * 2  # (original, crop, target) at the pixel size
    # the text sequence: both encoders' penultimate hidden states side by side; pooled: encoder 2's projection
    ids = m.tokenizer(["a red square"], padding="max_length", max_length=8, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        h1 = m.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        out2 = m.text_encoder_2(ids, output_hidden_states=True)
    torch.testing.assert_close(c.text[:1], torch.cat([h1, out2.hidden_states[-2]], -1))
    torch.testing.assert_close(c.pooled[:1], out2.text_embeds)
    neg = m.negative_conditioning("")  # force_zeros_for_empty_prompt, as StableDiffusionXLPipeline
    assert neg.text.abs().sum() == 0 and neg.pooled.abs().sum() == 0 and neg.time_ids.tolist() == c.time_ids[:1].tolist()
    assert set(m.component_hashes) == {"unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
                                       "scheduler"}


def test_sd3_conditioning_is_the_pipelines(families, tmp_path):
    m = families["sd3"].model()
    assert type(m).__name__ == "SD3Model" and m.objective.kind.is_flow and m.default_guidance_scale == 7.0
    c = m.encode_prompts(["a red square", ""])
    assert c.text.shape == (2, 8 + 8, 64) and c.pooled.shape == (2, 32) and c.time_ids is None
    ids = m.tokenizer(["a red square"], padding="max_length", max_length=8, truncation=True, return_tensors="pt").input_ids
    t5_ids = m.tokenizer_3(["a red square"], padding="max_length", max_length=8, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        o1, o2 = (e(ids, output_hidden_states=True) for e in (m.text_encoder, m.text_encoder_2))
        t5 = m.text_encoder_3(t5_ids)[0]
    clip = torch.cat([o1.hidden_states[-2], o2.hidden_states[-2], torch.zeros(1, 8, 0)], -1)  # 32 + 32 = T5's 64
    torch.testing.assert_close(c.text[:1], torch.cat([clip, t5], 1))
    torch.testing.assert_close(c.pooled[:1], torch.cat([o1.text_embeds, o2.text_embeds], -1))
    assert m.negative_conditioning("").allclose(c[1:])  # the empty prompt is encoded, not zeroed
    assert {"text_encoder_3", "tokenizer_3", "transformer"} <= set(m.component_hashes)
    # the network input is sigma T, and the transformer is called by keyword
    t = torch.tensor([10, 90])
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(m.objective.model_timesteps(t), m.scheduler.sigmas[100 - 1 - t].float() * 100)
    with torch.no_grad():
        want = m.unet(hidden_states=x, encoder_hidden_states=c.text, pooled_projections=c.pooled,
                      timestep=m.objective.model_timesteps(t)).sample
    torch.testing.assert_close(m.prediction_at(x, t, c), want)
    # without T5 (allowed by diffusers): zeros of (256, joint_attention_dim) in its place
    d = tmp_path / "no_t5"
    shutil.copytree(families["sd3"].model_dir, d, ignore=shutil.ignore_patterns("text_encoder_3", "tokenizer_3"))
    bare = load_model(d).encode_prompts(["a red square"])
    assert bare.text.shape == (1, 8 + 256, 64) and bare.text[:, 8:].abs().sum() == 0
    torch.testing.assert_close(bare.text[:, :8], c.text[:1, :8])
    shutil.rmtree(d / "tokenizer")
    with pytest.raises(ModelLoadError, match="StableDiffusion3Pipeline without tokenizer/"):
        load_model(d)


def test_flux_conditioning_and_transformer_call_are_the_pipelines(families):
    """encode_prompt's CLIP pooled output and T5 states, FLUX's latent normalization, and the model call:
    predict on unpacked latents = the transformer called as FluxPipeline calls it on packed ones."""
    from diffusers import FluxPipeline

    from attribution.models.flux import FLUX_COMPONENTS

    m = families["flux"].model()
    assert type(m).__name__ == "FluxModel" and m.family == "FLUX" and m.default_guidance_scale == 3.5
    assert m.guidance_kind == "embedded" and m.image_shape == (4, 8, 8) and m.pixel_shape == (3, 16, 16)
    c = m.encode_prompts(["a red square", ""])
    assert c.text.shape == (2, 8, 64) and c.pooled.shape == (2, 32) and c.time_ids is None
    assert c.guidance.tolist() == [3.5, 3.5]  # the training-loss guidance (TRAIN_GUIDANCE)
    ids = m.tokenizer(["a red square"], padding="max_length", max_length=8, truncation=True, return_tensors="pt").input_ids
    t5_ids = m.tokenizer_2(["a red square"], padding="max_length", max_length=8, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        pooled, t5 = m.text_encoder(ids).pooler_output, m.text_encoder_2(t5_ids)[0]
    torch.testing.assert_close(c.pooled[:1], pooled)
    torch.testing.assert_close(c.text[:1], t5)
    assert set(m.component_hashes) == set(FLUX_COMPONENTS)
    image = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        mean = m.vae.encode(image).latent_dist.mean
    torch.testing.assert_close(m.encode(image), (mean - FLUX_SHIFT_FACTOR) * FLUX_SCALING_FACTOR)
    torch.testing.assert_close(m.decode(m.encode(image)), m.vae.decode(mean).sample.clamp(-1, 1))
    # the pipeline's call: packed latents, timestep / 1000, the guidance scale expanded, zero txt_ids
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    tau = m.objective.model_timesteps(t)
    g = c.with_guidance(5.0)
    with torch.no_grad():
        out = m.unet(hidden_states=FluxPipeline._pack_latents(x, 2, 4, 8, 8), timestep=tau / 1000,
                     guidance=torch.full([1], 5.0).expand(2), pooled_projections=c.pooled, encoder_hidden_states=c.text,
                     txt_ids=torch.zeros(8, 3), img_ids=FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32),
                     return_dict=False)[0]
    want = FluxPipeline._unpack_latents(out, 16, 16, m.vae_scale_factor)
    torch.testing.assert_close(m.prediction_at(x, t, g), want)
    torch.testing.assert_close(m.predict(select_params(m), x, tau, g), want)
    assert not torch.allclose(m.prediction_at(x, t, c), want)  # guidance 3.5 vs 5 reaches the prediction
    with pytest.raises(ValueError, match="needs guidance"):
        m.prediction_at(x, t, Conditioning(text=c.text, pooled=c.pooled))


def test_flux_sigmas_are_the_pipelines_dynamically_shifted_ones(families):
    """Training grid = the scheduler's set_timesteps(T, mu) sigmas; sampling steps = FluxPipeline's
    linspace(1, 1/S, S) shifted by the same mu, with mu = calculate_shift(h w / 4 packed tokens)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    m = families["flux"].model()
    cfg = m.scheduler.config
    mu = calculate_shift(16, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift)
    assert m.image_seq_len == 16 and m.objective.mu == pytest.approx(mu)
    sched = FlowMatchEulerDiscreteScheduler.from_config(cfg)
    sched.set_timesteps(1000, mu=mu)
    torch.testing.assert_close(m.objective.table.flip(0), sched.sigmas[:-1])
    torch.testing.assert_close(m.objective.model_time.flip(0), sched.timesteps)
    assert not torch.allclose(m.objective.table.flip(0), FlowMatchEulerDiscreteScheduler.from_config(cfg).sigmas)
    for steps in (4, 10, 50):
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        sampler = StepSampler(m, SamplingConfig(num_inference_steps=steps))
        levels = torch.tensor([sampler.level(s) for s in range(steps + 1)])
        torch.testing.assert_close(levels, sched.sigmas, rtol=1e-5, atol=1e-6)


def test_flux_samples_with_one_prediction_per_step(families, monkeypatch):
    """FLUX-dev: no classifier-free batch; the transformer sees the sampling scale as its guidance input."""
    m = families["flux"].model()
    seen = []
    forward = m.unet.forward

    def spy(*args, **kw):
        seen.append((kw["hidden_states"].shape[0], kw["guidance"].tolist()))
        return forward(*args, **kw)

    monkeypatch.setattr(m.unet, "forward", spy)
    traj = sample_trajectory(m, SamplingConfig(num_inference_steps=3, seed=0, prompt="a red square", guidance_scale=6.0))
    assert seen == [(1, [6.0])] * 3 and traj.uncond is None and traj.config.guidance_scale == 6.0


@pytest.fixture(scope="session")
def flux_schnell(tmp_path_factory):
    """A schnell-like FLUX pipeline: no guidance embedding."""
    return load_model(make_tiny_flux_pipeline(tmp_path_factory.mktemp("schnell") / "flux", guidance=False))


def test_flux_without_guidance_embedding_takes_no_guidance(flux_schnell, monkeypatch):
    m = flux_schnell
    assert m.guidance_kind == "none" and "train_guidance" not in m.objective.identity
    c = m.encode_prompts(["a red square"])
    assert c.guidance is None and set(c.present()) == {"text", "pooled"}
    seen = []
    forward = m.unet.forward
    monkeypatch.setattr(m.unet, "forward", lambda *a, **kw: seen.append((kw["hidden_states"].shape[0], kw["guidance"]))
                        or forward(*a, **kw))
    cfg = SamplingConfig(num_inference_steps=2, seed=0, prompt="a red square", guidance_scale=1.0)
    a, b = sample_trajectory(m, cfg), sample_trajectory(m, cfg, guidance_scale=7.0)  # the scale is ignored, as schnell's
    assert torch.equal(a.x_t, b.x_t) and b.uncond is None and seen == [(1, None)] * 4
    with pytest.raises(ValueError, match="no guidance embedding"):
        m.prediction_at(torch.randn(1, 4, 8, 8), torch.tensor([5]), c.with_guidance(3.5))
    with pytest.raises(ValueError, match="no guidance embedding"):
        m.set_train_guidance(1.0)
    ts, noises = _draws(m, 2)
    grads = per_example_grads(m, select_params(m, ("proj_out",)), get_output("loss"), torch.randn(2, 4, 8, 8), ts,
                              noises, cond=m.encode_prompts(["a", "b"]))
    assert grads.shape == (2, 16 * 32 + 16) and grads.abs().max() > 0


def test_flux_store_records_the_training_guidance(families, tmp_path):
    """Train features are conditioned on the guidance embedding TRAIN_GUIDANCE; a model attributed with
    another value gets other gradients and is refused by the store, naming the guidance."""
    fam = families["flux"]
    base = fam.model()
    data = fam.dataset(base)
    cfg = FeaturizeConfig(num_draws=1, proj_dim=8, param_filter=fam.small_params, store_dtype="float32")
    store = featurize([base], data, tmp_path / "store", cfg)
    assert json.loads((store.root / "manifest.json").read_text())["objective"]["train_guidance"] == "3.5"
    m = fam.model()
    m.set_train_guidance(1.0)
    assert m.encode_prompts(["x"]).guidance.tolist() == [1.0] and "guidance embedding 1" in m.objective.describe()
    with pytest.raises(StoreError, match="the guidance embedding of the training loss differs: the store was built "
                                         "with 3.5, the model uses 1"):
        Store.open(store.root, store_spec([m], data, cfg))
    Store.open(store.root, store_spec([fam.model()], data, cfg))  # the same value reopens it
    latents = encode_dataset(data, base)
    prompts = example_prompts(base, data, np.arange(2))
    ts, noises = _draws(m, 2)

    def grads(model):
        return per_example_grads(model, select_params(model, fam.small_params), get_output("loss"),
                                 latents.images(range(2)), ts, noises, cond=model.encode_prompts(prompts))

    assert not torch.allclose(grads(m), grads(base))


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_flow_trajectory_x0_hat_is_x_t_minus_sigma_v(families, name):
    """SD3: v = v_u + s (v_c - v_u) (CFG); FLUX-dev: v = v(x_t, sigma, cond, guidance = s), one prediction."""
    m = families[name].model()
    traj = sample_trajectory(m, SamplingConfig(num_inference_steps=4, seed=2, prompt="a blue circle", guidance_scale=7.0))
    cond, uncond = m.encode_prompts(["a blue circle"]), m.negative_conditioning("")
    n = len(traj.timesteps)
    if name == "flux":
        v = m.prediction_at(traj.x_t, traj.timesteps, cond.with_guidance(7.0).expand(n))
    else:
        v_c, v_u = m.prediction_at(traj.x_t, traj.timesteps, cond.expand(n)), m.prediction_at(traj.x_t, traj.timesteps, uncond.expand(n))
        v = v_u + 7.0 * (v_c - v_u)
    sigma = m.objective.coefficients(traj.timesteps)[1].view(-1, 1, 1, 1)
    torch.testing.assert_close(traj.x0_hat, traj.x_t - sigma * v, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_flow_refined_inversion_is_a_fixed_point_of_the_sampler(families, name):
    from attribution.sampling import invert_image

    fam = families[name]
    m = fam.model()
    image = fam.dataset(m).images([2])[0]

    def step_errors(traj):
        a, b = m.objective.coefficients(traj.timesteps)
        a_next = torch.cat([a[1:], torch.ones(1)]).view(-1, 1, 1, 1)  # the last Euler step lands on sigma = 0
        b_next = torch.cat([b[1:], torch.zeros(1)]).view(-1, 1, 1, 1)
        landed = a_next * traj.x0_hat + b_next * traj.eps
        return (landed - torch.cat([traj.x_t[1:], traj.sample[None]])).abs().amax(dim=(1, 2, 3))

    plain = invert_image(m, image, num_inference_steps=5, prompt=fam.prompt, refine_iters=0)
    refined = invert_image(m, image, num_inference_steps=5, prompt=fam.prompt, refine_iters=8)
    torch.testing.assert_close(refined.sample, m.encode(image[None])[0])
    e_plain, e_refined = step_errors(plain), step_errors(refined)
    assert e_refined.max() < 1e-3 * max(1.0, e_plain.max().item()) and e_plain.max() > 10 * e_refined.max()


def test_dit_classes_come_from_id2label_and_subfolders(families):
    fam = families["dit"]
    m = fam.model()
    assert type(m).__name__ == "DiTModel" and m.is_class_conditional and m.image_shape == (4, 8, 8)
    assert m.class_names == ["red square", "blue circle", "green stripes", "yellow cross"]
    assert m.encode_prompts(["red block", "red square", "blue circle", "3", ""]).labels.tolist() == [0, 0, 1, 3, 4]
    with pytest.raises(ValueError, match="'purple' is not a class"):
        m.encode_prompts(["purple"])
    data = fam.dataset(m)
    assert example_prompts(m, data, np.arange(len(data)))[::3] == ["3", "blue circle", "red block"]  # sorted folders
    x = torch.randn(2, 4, 8, 8)
    out = m.unet(x, torch.tensor([5, 5]), class_labels=torch.tensor([0, 1])).sample
    assert out.shape == (2, 8, 8, 8)  # eps and the learned-variance half
    torch.testing.assert_close(m.eps(x, torch.tensor([5, 5]), m.encode_prompts(["red square", "blue circle"])), out[:, :4])
    # a folder of a class the model does not know is refused, naming it
    bad = Path(fam.data_dir).parent / "bad_classes"
    write_class_folder(bad, classes=("blue circle", "purple"), per_class=1)
    with pytest.raises(ValueError, match="'purple' is not a class"):
        featurize([m], image_folder_dataset(bad, m.pixel_shape), bad.parent / "bad_store", FeaturizeConfig(proj_dim=8))
    with pytest.raises(ValueError, match="one subfolder per class"):
        featurize([m], image_folder_dataset(families["sdxl"].data_dir, m.pixel_shape), bad.parent / "s2",
                  FeaturizeConfig(proj_dim=8))


@pytest.mark.parametrize("name, why", [
    ("StableVideoDiffusionPipeline", ";"), ("StableDiffusionControlNetPipeline", ";"), ("KandinskyV22Pipeline", ";"),
    ("FluxFillPipeline", r" \(its transformer takes image inputs besides the noisy latents; only text-to-image "
                         r"FluxPipeline is implemented\);"),
])
def test_unsupported_pipelines_are_refused_by_name(families, tmp_path, name, why):
    d = tmp_path / name
    shutil.copytree(families["sdxl"].model_dir, d)
    write_model_index(d, name)
    with pytest.raises(ModelLoadError, match=rf"holds a {name}, which is not supported{why} supported pipelines: DDPMPipeline"):
        load_model(d)


# ---------------------------------------------------------------------- gradients
def _draws(model, n: int, draws: int = 2):
    return draw_timesteps_and_noise(np.arange(n), FeaturizeConfig(num_draws=draws), model.num_train_timesteps,
                                    model.image_shape)


def test_vmap_grads_equal_looped_autograd_without_unannounced_fallbacks(family, loaded):
    model, _, latents, prompts = loaded
    params = select_params(model)  # every parameter: attention, adaptive norms, embeddings
    ts, noises = _draws(model, 3)
    cond = model.encode_prompts(prompts[:3])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = per_example_grads(model, params, get_output("loss"), latents.images(range(3)), ts, noises,
                                 chunk_size=2, cond=cond)
    assert not [w for w in caught if "batching rule" in str(w.message)], [str(w.message) for w in caught]
    slow = looped_grads(model, params, get_output("loss"), latents.images(range(3)), ts, noises, cond=cond)
    assert slow.abs().max() > 0
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5 * float(slow.abs().max()))
    other = per_example_grads(model, params, get_output("loss"), latents.images(range(3)), ts, noises,
                              cond=model.encode_prompts([family.other_prompt] * 3))
    assert not torch.allclose(other, fast)  # the conditioning reaches the gradient


def test_vmap_fallbacks_are_announced_once_naming_the_operator():
    from attribution.features.gradients import vmap_fallbacks_reported

    drop = "There is a performance drop because we have not yet implemented the batching rule for {}. Please file..."
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            with vmap_fallbacks_reported():
                warnings.warn(drop.format("aten::_test_adaptive_norm_op"))
                warnings.warn(drop.format("aten::_scaled_dot_product_flash_attention_for_cpu"))
                warnings.warn("something else", UserWarning)
    messages = [str(w.message) for w in caught]
    assert [m for m in messages if "_test_adaptive_norm_op" in m] == [
        "per-example gradients: aten::_test_adaptive_norm_op has no vmap batching rule, so torch runs it one example "
        "at a time (a slow path) in this model"]
    assert messages.count("something else") == 2 and not [m for m in messages if "flash_attention" in m]


def test_lora_gradients_are_the_adapters_columns_of_full_gradients(family, loaded):
    base, _, latents, prompts = loaded
    m = family.model()
    names = add_lora(m, rank=2, random_init=True)  # peft on to_q, to_k, to_v, to_out.0
    assert names and all(any(f".{t}." in n for t in ("to_q", "to_k", "to_v", "to_out.0")) for n in names)
    assert m.checkpoint_hash != base.checkpoint_hash
    ts, noises = _draws(m, 2)
    cond, out = m.encode_prompts(prompts[:2]), get_output("loss")
    full_params = select_params(m)
    full = per_example_grads(m, full_params, out, latents.images(range(2)), ts, noises, cond=cond)
    offsets = np.cumsum([0] + [v.numel() for v in full_params.values()])
    cols = torch.cat([full[:, offsets[i] : offsets[i + 1]] for i, k in enumerate(full_params) if "lora_" in k], 1)
    lora_only = per_example_grads(m, select_params(m, lora_param_filter(m.unet)), out, latents.images(range(2)), ts,
                                  noises, cond=cond)
    assert lora_only.abs().max() > 0
    torch.testing.assert_close(lora_only, cols, rtol=1e-4, atol=1e-6)


def test_peft_adapter_directory_reloads_with_identical_gradients(family, loaded, tmp_path):
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    _, _, latents, prompts = loaded
    trained = family.model()
    add_lora(trained, rank=2, alpha=4, random_init=True)
    state = get_peft_model_state_dict(trained.unet)
    trained.unet.peft_config["default"].save_pretrained(tmp_path / "peft")
    save_file({f"base_model.model.{k}": v.contiguous() for k, v in state.items()}, tmp_path / "peft" / "adapter_model.safetensors")
    reloaded = family.model()
    load_lora(reloaded, tmp_path / "peft")
    assert reloaded.checkpoint_hash == trained.checkpoint_hash
    ts, noises = _draws(trained, 2)

    def grads(m):
        return per_example_grads(m, select_params(m, ("re:lora_",)), get_output("loss"), latents.images(range(2)),
                                 ts, noises, cond=m.encode_prompts(prompts[:2]))

    torch.testing.assert_close(grads(reloaded), grads(trained), rtol=1e-5, atol=1e-7)


def test_sdxl_lora_weights_load_as_the_training_script_saves_them(families, tmp_path):
    """train_text_to_image_lora_sdxl.py saves the UNet's peft layers, converted to diffusers keys, with
    StableDiffusionXLPipeline.save_lora_weights: ``pytorch_lora_weights.safetensors``, keys ``unet.*``."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import get_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import save_file

    fam = families["sdxl"]
    trained = fam.model()
    add_lora(trained, rank=2, alpha=4, random_init=True)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(trained.unet))
    StableDiffusionXLPipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=layers)
    with safe_open(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"), framework="pt") as f:
        assert all(k.startswith("unet.") for k in f.keys())
    loaded = fam.model()
    names = load_lora(loaded, tmp_path / "lora")
    assert sorted(names) == sorted(lora_param_filter(trained.unet))
    for k, v in trained.unet.named_parameters():
        if "lora_" in k:
            torch.testing.assert_close(dict(loaded.unet.named_parameters())[k], v)
    # a file that also adapts text_encoder_2 is refused, naming the reason
    (tmp_path / "te2").mkdir()
    save_file({"text_encoder_2.x.lora_A.weight": torch.zeros(2, 2)}, tmp_path / "te2" / "pytorch_lora_weights.safetensors")
    with pytest.raises(ModelLoadError, match="adapts a text encoder"):
        load_lora(fam.model(), tmp_path / "te2")


@pytest.mark.parametrize("name, pipeline, text_encoder", [
    ("sd3", "StableDiffusion3Pipeline", "text_encoder_3"), ("flux", "FluxPipeline", "text_encoder"),
])
def test_transformer_lora_weights_load_as_the_training_script_saves_them(families, tmp_path, name, pipeline, text_encoder):
    """train_dreambooth_lora_sd3.py and train_dreambooth_lora_flux.py save the transformer's peft layers with
    the pipeline's save_lora_weights: ``pytorch_lora_weights.safetensors``, keys ``transformer.*``. FLUX's
    adapter covers the double blocks' and the single blocks' attention."""
    import diffusers
    from peft import get_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import save_file

    fam = families[name]
    trained = fam.model()
    names = add_lora(trained, rank=2, alpha=4, random_init=True)
    if name == "flux":
        assert {n.split(".")[0] for n in names} == {"transformer_blocks", "single_transformer_blocks"}
    getattr(diffusers, pipeline).save_lora_weights(  # with the adapter's config as metadata, as the scripts save alpha
        tmp_path / "lora", transformer_lora_layers=get_peft_model_state_dict(trained.unet),
        transformer_lora_adapter_metadata=trained.unet.peft_config["default"].to_dict())
    with safe_open(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"), framework="pt") as f:
        assert all(k.startswith("transformer.") for k in f.keys() if "lora" in k)
    loaded = fam.model()
    assert sorted(load_lora(loaded, tmp_path / "lora")) == sorted(lora_param_filter(trained.unet))
    assert loaded.unet.peft_config["default"].lora_alpha == 4 and loaded.checkpoint_hash == trained.checkpoint_hash
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([10, 70]), trained.encode_prompts(["a red square", "blue"])
    assert not torch.allclose(trained.prediction_at(x, t, c), fam.model().prediction_at(x, t, c))
    torch.testing.assert_close(loaded.prediction_at(x, t, c), trained.prediction_at(x, t, c))
    (tmp_path / "te").mkdir()
    save_file({f"{text_encoder}.x.lora_A.weight": torch.zeros(2, 2)}, tmp_path / "te" / "pytorch_lora_weights.safetensors")
    with pytest.raises(ModelLoadError, match="adapts a text encoder"):
        load_lora(fam.model(), tmp_path / "te")


# ---------------------------------------------------------------------- sampling
def test_trajectory_is_reproducible_and_guided(family, loaded):
    model = loaded[0]
    cfg = SamplingConfig(num_inference_steps=3, seed=4, prompt=family.prompt, guidance_scale=3.0)
    a, b = sample_trajectory(model, cfg), sample_trajectory(model, cfg)
    assert torch.equal(a.x_t, b.x_t) and torch.equal(a.sample, b.sample) and a.prompt == family.prompt
    cond, uncond = model.encode_prompts([family.prompt]), model.negative_conditioning("")
    t0 = a.timesteps[:1]
    if family.name == "flux":  # guidance-distilled: the scale is the guidance embedding, no negative branch
        assert a.uncond is None and a.cond.allclose(cond.with_guidance(3.0)) and cond.guidance.tolist() == [3.5]
        torch.testing.assert_close(a.eps[:1], model.eps(a.x_t[:1], t0, cond.with_guidance(3.0)), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(guided_eps(model, a.x_t[:1], t0, a.cond), a.eps[:1], rtol=1e-4, atol=1e-5)
        t1 = a.timesteps[1:2]  # (at sigma = 1 the flow's eps_hat is x_t, whatever the prediction)
        assert not torch.allclose(model.eps(a.x_t[1:2], t1, cond), a.eps[1:2])  # the embedding reaches the prediction
    else:
        assert a.cond.allclose(cond) and a.uncond.allclose(uncond)
        eps_c, eps_u = model.eps(a.x_t[:1], t0, cond), model.eps(a.x_t[:1], t0, uncond)
        torch.testing.assert_close(a.eps[:1], eps_u + 3.0 * (eps_c - eps_u), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(guided_eps(model, a.x_t[:1], t0, cond, uncond, 3.0), a.eps[:1], rtol=1e-4, atol=1e-5)
    other = sample_trajectory(model, cfg, prompt=family.other_prompt)
    assert not torch.allclose(other.x_t[1], a.x_t[1])
    if family.name == "dit":
        assert uncond.labels.tolist() == [len(ID2LABEL)]  # the null class, as DiTPipeline


# ---------------------------------------------------------------------- scores
def test_identity_projection_scores_equal_explicit_solve(family, loaded, identity_store):
    model, _, latents, prompts = loaded
    store, cfg = identity_store
    traj = sample_trajectory(model, SamplingConfig(num_inference_steps=4, seed=1, prompt=family.prompt, guidance_scale=2.0))
    query = QueryConfig(num_resamples=3, ridge=RIDGE)
    scorer = Scorer(store, [model], "journey", query)
    pixel_mask = np.zeros((16, 16))
    pixel_mask[4:12, 2:10] = 1
    got = scorer.score(traj, [1, 3], mask=pixel_mask).scores
    latent_mask = downsample_mask(torch.as_tensor(pixel_mask, dtype=torch.float32)[None], (8, 8))
    want = explicit_scores([model], latents.latents, cfg, traj, [1, 3], query, latent_mask, captions=prompts)
    assert got.shape == (2, len(prompts))
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())
    assert not np.allclose(scorer.score(traj, [1], mask=pixel_mask, prompt=family.other_prompt).scores, got[:1])


def test_self_attribution(family, loaded, identity_store):
    """A training example's gradient from its own draws and conditioning, as the query, ranks itself
    first (see tests/test_latent.py::test_self_attribution for why this holds on random weights)."""
    model, _, latents, prompts = loaded
    store, cfg = identity_store
    assert_self_attribution(Scorer(store, [model], "journey", QueryConfig(ridge=1e-6)), cfg, latents.latents, prompts)


def test_store_is_refused_for_another_text_encoder_or_transformer(family, loaded, identity_store):
    store, cfg = identity_store
    other = load_model(family.other_dir)
    with pytest.raises(StoreError, match=rf"checkpoint 0 differs in its {family.other_component}: "):
        Store.open(store.root, store_spec([other], loaded[1], cfg))
    assert "\n" not in str(pytest.raises(StoreError, Store.open, store.root, store_spec([other], loaded[1], cfg)).value)
    manifest = json.loads((store.root / "manifest.json").read_text())
    assert family.other_component in manifest["checkpoints"][0]["components"]


# ---------------------------------------------------------------------- the app
@pytest.fixture
def family_app(family, loaded, tmp_path_factory, monkeypatch):
    """The app launched on a family's pipeline, data and a journey store (as ``--model DIR --data ... --store ...``)."""
    import ui

    model, data, _, _ = loaded
    root = tmp_path_factory.mktemp(f"app_{family.name}")
    featurize([model], data, root / "store", FeaturizeConfig(proj_dim=16, num_draws=1, store_dtype="float32"))
    allowed = ":".join(str(p) for p in (family.model_dir.parent, family.data_dir, root))
    for k, v in {"ATTRIBUTION_MODEL": str(family.model_dir), "ATTRIBUTION_DATA": str(family.data_dir),
                 "ATTRIBUTION_STORE": str(root / "store"), "ATTRIBUTION_ALLOWED_DIRS": allowed}.items():
        monkeypatch.setenv(k, v)
    ws = ui.get_workspace()
    monkeypatch.setattr(ws, "prefetch", lambda key, method, steps, chunk=5: None)
    return ws


def test_app_shows_the_familys_conditioning_inputs(family, family_app):
    ws = family_app
    at = make_app()
    assert ws.family in ("Stable Diffusion XL", "DiT", "Stable Diffusion 3", "FLUX") and at.number_input(key="guidance_input").value == ws.default_guidance_scale
    if family.name == "dit":
        picker = at.selectbox(key="prompt_input")
        assert picker.label == "Class" and picker.options == ws.class_choices and picker.value == "yellow cross"
        assert not [t for t in at.text_input if t.key == "prompt_input"]
        picker.set_value(family.prompt)
    else:
        box = at.text_input(key="prompt_input")
        assert box.label == "Prompt" and box.value == CAPTIONS[0]
        box.set_value(family.prompt)
    at.number_input(key="guidance_input").set_value(2.0)
    at.number_input(key="seed_input").set_value(3)
    [b for b in at.button if b.label == "Generate"][0].click().run()
    assert not at.exception, [e.message for e in at.exception]
    assert at.session_state["sample"] == {"kind": "seed", "seed": 3, "prompt": family.prompt, "guidance_scale": 2.0}
    traj = ws.trajectory(at.session_state["sample_key"])
    assert traj.prompt == family.prompt and traj.config.guidance_scale == 2.0
    row = ws.scores(at.session_state["sample_key"], "journey", [at.select_slider(key="step").value])[0]
    assert row.shape == (ws.num_train,) and np.isfinite(row).all()
    for page in ("about", "compare", "curves", "over_steps"):
        make_app(page)
