"""Latent text-conditional models (Stable-Diffusion layout) on tiny random components.

The same invariants as for pixel models (tests/test_core.py), with captions as
conditioning of train features and the prompt as conditioning of queries:
vmapped = looped gradients, identity projection = explicit TRAK solve,
self-attribution, store refusal on another VAE / text encoder, and LoRA-only
gradients = the LoRA columns of the full gradients.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from latent_builders import CAPTIONS  # noqa: E402
from trak_checks import assert_self_attribution, explicit_scores  # noqa: E402

from attribution.config import FeaturizeConfig, QueryConfig, SamplingConfig
from attribution.data import image_folder_dataset
from attribution.features import (
    LatentDataset,
    Store,
    StoreError,
    draw_timesteps_and_noise,
    encode_dataset,
    featurize,
    get_output,
    looped_grads,
    per_example_grads,
    select_params,
    store_spec,
)
from attribution.models import add_lora, load_model, load_models, lora_param_filter, module_param_filter
from attribution.sampling import continue_from_step, guided_eps, invert_image, sample_trajectory
from attribution.scoring import Scorer, downsample_mask, prepare_mask

# conv_out (292) + the cross-attention key projection of the first down block (256):
# small enough for an identity projection, and it exercises regex filters and the text path.
SMALL_PARAMS = ("conv_out", r"re:^down_blocks\.0\..*attn2\.to_k\.")
# Relative ridge of the explicit-solve comparison. Phi Phi^T has rank 8 here, and float32
# gradient noise (~1e-6 relative, vmap vs loop) is amplified by about ||K|| / lambda in the
# solve: at 1e-2 that measured 0.6 % on some scores, at 1e-1 the comparison holds to 1e-3.
RIDGE = 1e-1


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def latent_model(latent_dirs):
    return load_model(latent_dirs["a"])


@pytest.fixture(scope="session")
def captioned(caption_folder, latent_model):
    return image_folder_dataset(caption_folder, latent_model.pixel_shape)


@pytest.fixture(scope="session")
def latent_data(captioned, latent_model) -> LatentDataset:
    return encode_dataset(captioned, latent_model)


@pytest.fixture(scope="session")
def identity_store(latent_model, captioned, tmp_path_factory):
    cfg = FeaturizeConfig(proj_kind="identity", num_draws=2, param_filter=SMALL_PARAMS, store_dtype="float32")
    return featurize([latent_model], captioned, tmp_path_factory.mktemp("stores") / "identity", cfg), cfg


# ---------------------------------------------------------------------- model adapter and data
def test_latent_pipeline_loads_with_the_core_interface(latent_model, latent_dirs):
    m = latent_model
    assert m.is_latent and m.is_conditional
    assert m.image_shape == (4, 8, 8) and m.pixel_shape == (3, 16, 16)
    assert m.num_train_timesteps == 100 and m.alphas_cumprod.shape == (100,)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    z = m.encode(images)
    assert z.shape == (2, 4, 8, 8) and torch.equal(z, m.encode(images))  # deterministic (posterior mean)
    assert m.decode(z).shape == (2, 3, 16, 16)
    emb = m.encode_prompts(["a red square", ""]).text
    assert emb.shape == (2, 8, 32) and not torch.allclose(emb[0], emb[1])
    hashes = {k: load_model(d).checkpoint_hash for k, d in latent_dirs.items()}
    assert len(set(hashes.values())) == 3 and hashes["a"] == m.checkpoint_hash
    assert len(load_models([latent_dirs["a"], latent_dirs["other_vae"]])) == 2


def test_captions_from_metadata_files(caption_folder, captioned, tmp_path):
    assert captioned.captions == CAPTIONS and captioned.image_shape == (3, 16, 16)
    # captions.csv beside the images, and captions change the fingerprint
    folder = tmp_path / "csv"
    shutil.copytree(caption_folder, folder, ignore=shutil.ignore_patterns("metadata.jsonl"))
    rows = ["file_name,text"] + [f'img{i}.png,"{c}, v2"' for i, c in enumerate(CAPTIONS)]
    (folder / "captions.csv").write_text("\n".join(rows) + "\n")
    ds = image_folder_dataset(folder, (3, 16, 16))
    assert ds.captions[0] == "a red square, v2"
    assert ds.fingerprint() != captioned.fingerprint()
    (folder / "captions.csv").write_text("\n".join(rows[:-1]) + "\n")
    with pytest.raises(ValueError, match="no caption"):
        image_folder_dataset(folder, (3, 16, 16))
    # a metadata file without a caption column (e.g. labels only) is not caption metadata
    (folder / "captions.csv").unlink()
    (folder / "metadata.csv").write_text("file_name,label\nimg0.png,3\n")
    assert image_folder_dataset(folder, (3, 16, 16)).captions is None


def test_latents_are_cached_and_keyed_on_the_vae(captioned, latent_model, latent_dirs, latent_data, tmp_path):
    a = encode_dataset(captioned, latent_model, cache_dir=tmp_path)
    files = list(tmp_path.glob("latents-*.npy"))
    assert len(files) == 1 and torch.equal(a.latents, latent_data.latents)
    assert torch.equal(encode_dataset(captioned, latent_model, cache_dir=tmp_path).latents, a.latents)
    assert a.image_shape == (4, 8, 8) and a.captions == CAPTIONS
    torch.testing.assert_close(a.images([1, 2]), latent_model.encode(captioned.images([1, 2])))
    b = encode_dataset(captioned, load_model(latent_dirs["other_vae"]), cache_dir=tmp_path)
    assert b.fingerprint() != a.fingerprint() and len(list(tmp_path.glob("latents-*.npy"))) == 2


def test_pixel_masks_are_area_averaged_onto_the_latent_grid(latent_model):
    mask = np.zeros((16, 16))
    mask[:4, :6] = 1
    m = prepare_mask(mask, latent_model.image_shape, latent_model)
    assert m.shape == (1, 8, 8)
    assert m[0, :2, :3].eq(1).all() and m[0, 2:].eq(0).all() and float(m.sum()) == pytest.approx(mask.sum() / 4)
    torch.testing.assert_close(downsample_mask(torch.ones(3, 16, 16), (8, 8)), torch.ones(1, 8, 8))
    with pytest.raises(ValueError, match="shape"):
        prepare_mask(np.ones((12, 12)), latent_model.image_shape, latent_model)
    with pytest.raises(ValueError, match="no pixel"):
        prepare_mask(np.zeros((16, 16)), latent_model.image_shape, latent_model)


# ---------------------------------------------------------------------- gradients
def test_conditional_vmap_grads_equal_looped_autograd(latent_model, latent_data):
    m = latent_model
    params = select_params(m, ("conv_in", "re:attn2", "time_embedding"))
    x0 = latent_data.images(range(3))
    ts, noises = draw_timesteps_and_noise(np.arange(3), FeaturizeConfig(num_draws=2), 100, m.image_shape)
    cond = m.encode_prompts(CAPTIONS[:3])
    fast = per_example_grads(m, params, get_output("loss"), x0, ts, noises, chunk_size=2, cond=cond)
    slow = looped_grads(m, params, get_output("loss"), x0, ts, noises, cond=cond)
    assert slow.abs().max() > 0
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5 * float(slow.abs().max()))
    other = per_example_grads(m, params, get_output("loss"), x0, ts, noises, cond=m.encode_prompts(["x"] * 3))
    assert not torch.allclose(other, fast)  # the caption conditions the gradient
    with pytest.raises(ValueError, match="conditional"):
        per_example_grads(m, params, get_output("loss"), x0, ts, noises)


def test_lora_gradients_are_the_lora_columns_of_full_gradients(latent_dirs, latent_data):
    pytest.importorskip("peft")
    m = load_model(latent_dirs["a"])
    base_hash = m.checkpoint_hash
    names = add_lora(m, rank=2, random_init=True)
    assert m.checkpoint_hash != base_hash and all("lora_" in n for n in names)
    assert tuple(names) == lora_param_filter(m.unet)
    x0 = latent_data.images(range(2))
    ts, noises = draw_timesteps_and_noise(np.arange(2), FeaturizeConfig(num_draws=2), 100, m.image_shape)
    cond = m.encode_prompts(CAPTIONS[:2])
    out = get_output("loss")
    full_params = select_params(m)  # every parameter, LoRA ones included
    full = per_example_grads(m, full_params, out, x0, ts, noises, cond=cond)
    cols, offset = [], 0
    for k, v in full_params.items():
        if "lora_" in k:
            cols.append(full[:, offset : offset + v.numel()])
        offset += v.numel()
    lora_only = per_example_grads(m, select_params(m, lora_param_filter(m.unet)), out, x0, ts, noises, cond=cond)
    assert lora_only.shape[1] == sum(full_params[n].numel() for n in names) and lora_only.abs().max() > 0
    torch.testing.assert_close(lora_only, torch.cat(cols, 1), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(
        per_example_grads(m, select_params(m, ("re:lora_",)), out, x0, ts, noises, cond=cond), lora_only
    )
    # named modules: every attention q/k/v/out projection, under the LoRA wrapper too
    attn = select_params(m, module_param_filter())
    assert attn and all(any(f".{t}." in k for t in ("to_q", "to_k", "to_v", "to_out.0")) for k in attn)


def _lora_grads(model, latent_data):
    x0 = latent_data.images(range(2))
    ts, noises = draw_timesteps_and_noise(np.arange(2), FeaturizeConfig(num_draws=2), 100, model.image_shape)
    params = select_params(model, ("re:lora_",))
    return per_example_grads(model, params, get_output("loss"), x0, ts, noises, cond=model.encode_prompts(CAPTIONS[:2]))


def test_saved_lora_weights_reload_with_identical_gradients(latent_dirs, latent_data, tmp_path):
    """A trained adapter saved by diffusers or peft and loaded again attributes exactly as before."""
    pytest.importorskip("peft")
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    from attribution.models import ModelLoadError, load_lora

    trained = load_model(latent_dirs["a"])
    add_lora(trained, rank=2, alpha=4, random_init=True)  # random B: as if trained
    want = _lora_grads(trained, latent_data)
    assert want.abs().max() > 0
    # diffusers: save_lora_adapter (bare keys) and the pipeline's save_lora_weights layout ("unet." prefix)
    trained.unet.save_lora_adapter(tmp_path / "diffusers")
    from diffusers import StableDiffusionPipeline

    state = get_peft_model_state_dict(trained.unet)
    config = trained.unet.peft_config["default"]
    StableDiffusionPipeline.save_lora_weights(tmp_path / "prefixed", unet_lora_layers=state,
                                              unet_lora_adapter_metadata=config.to_dict())
    # peft: adapter_config.json + adapter_model.safetensors (PeftModel.save_pretrained's key prefix)
    config.save_pretrained(tmp_path / "peft")
    save_file({f"base_model.model.{k}": v.contiguous() for k, v in state.items()}, tmp_path / "peft" / "adapter_model.safetensors")
    for source in ("diffusers", "prefixed", "peft", "prefixed/pytorch_lora_weights.safetensors"):
        model = load_model(latent_dirs["a"])
        names = load_lora(model, tmp_path / source)
        assert sorted(names) == sorted(lora_param_filter(trained.unet)), source
        assert model.checkpoint_hash == trained.checkpoint_hash, source  # a store of the trained model is accepted
        torch.testing.assert_close(_lora_grads(model, latent_data), want, rtol=1e-5, atol=1e-7)
    # refusals: another adapter (other weights -> other hash), pickles, text-encoder LoRA, a second adapter
    other = load_model(latent_dirs["a"])
    add_lora(other, rank=2, alpha=4, random_init=True)
    assert other.checkpoint_hash != trained.checkpoint_hash
    (tmp_path / "pickle").mkdir()
    (tmp_path / "pickle" / "pytorch_lora_weights.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelLoadError, match="holds no LoRA weights"):
        load_lora(load_model(latent_dirs["a"]), tmp_path / "pickle")
    (tmp_path / "te").mkdir()
    save_file({"text_encoder.x.lora_A.weight": torch.zeros(2, 2)}, tmp_path / "te" / "pytorch_lora_weights.safetensors")
    with pytest.raises(ModelLoadError, match="text encoder"):
        load_lora(load_model(latent_dirs["a"]), tmp_path / "te")
    with pytest.raises(ModelLoadError, match="already has"):
        load_lora(trained, tmp_path / "peft")


# ---------------------------------------------------------------------- sampling
def test_guided_sampling_records_latents_and_decodes(latent_model):
    m = latent_model
    cfg = SamplingConfig(num_inference_steps=4, seed=3, prompt="a red square", guidance_scale=3.0)
    traj = sample_trajectory(m, cfg)
    assert traj.x_t.shape == (4, 4, 8, 8) and traj.prompt == "a red square" and traj.cond.text.shape == (1, 8, 32)
    assert traj.decoded_x0_hat.shape == (4, 3, 16, 16) and traj.display_sample.shape == (3, 16, 16)
    t0 = traj.timesteps[:1]
    cond, uncond = m.encode_prompts(["a red square"]), m.encode_prompts([""])
    eps_c = m.eps(traj.x_t[:1], t0, cond)
    eps_u = m.eps(traj.x_t[:1], t0, uncond)
    torch.testing.assert_close(traj.eps[:1], eps_u + 3.0 * (eps_c - eps_u), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(guided_eps(m, traj.x_t[:1], t0, cond, uncond, 3.0), traj.eps[:1], rtol=1e-4, atol=1e-5)
    plain = sample_trajectory(m, cfg, guidance_scale=1.0)
    assert plain.uncond is None and not torch.allclose(plain.x_t[1], traj.x_t[1])
    other = sample_trajectory(m, cfg, prompt="blue stripes")
    assert not torch.allclose(other.x_t[1], traj.x_t[1])
    assert continue_from_step(m, traj, 2, num_samples=2).shape == (2, 3, 16, 16)
    inv = invert_image(m, torch.rand(3, 16, 16) * 2 - 1, num_inference_steps=3, prompt="a red square")
    assert inv.x_t.shape == (3, 4, 8, 8) and inv.sample.shape == (4, 8, 8) and inv.decoded_sample.shape == (3, 16, 16)


# ---------------------------------------------------------------------- scores
def test_identity_projection_scores_equal_explicit_solve(latent_model, latent_data, identity_store):
    store, cfg = identity_store
    assert store.proj_dim == 548 and store.manifest["dataset"]["image_shape"] == [4, 8, 8]
    traj = sample_trajectory(latent_model, SamplingConfig(num_inference_steps=5, seed=1, prompt="a blue circle", guidance_scale=2.0))
    query = QueryConfig(num_resamples=3, ridge=RIDGE)
    scorer = Scorer(store, [latent_model], "journey", query)
    steps = [0, 2, 4]
    got = scorer.score(traj, steps).scores
    want = explicit_scores([latent_model], latent_data.latents, cfg, traj, steps, query, captions=CAPTIONS)
    assert got.shape == (3, 8)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())
    # a pixel mask is downsampled to the latent grid before entering f_s
    pixel_mask = np.zeros((16, 16))
    pixel_mask[4:12, 2:10] = 1
    masked = scorer.score(traj, [2], mask=pixel_mask).scores
    latent_mask = downsample_mask(torch.as_tensor(pixel_mask, dtype=torch.float32)[None], (8, 8))
    want_m = explicit_scores([latent_model], latent_data.latents, cfg, traj, [2], query, latent_mask, captions=CAPTIONS)
    np.testing.assert_allclose(masked, want_m, rtol=1e-3, atol=1e-4 * np.abs(want_m).max())
    # the query is conditioned on the prompt: another prompt, other scores
    assert not np.allclose(scorer.score(traj, [2], prompt="green stripes").scores, got[1:2])


def test_self_attribution(latent_model, latent_data, identity_store):
    """A training example used as the query ranks itself first.

    The query gradient is built from the example's own (t, eps) draws and caption,
    so it *is* its train feature phi_j; with the identity projection
    Phi (Phi^T Phi + lambda I)^-1 phi_j = (Phi Phi^T + lambda I)^-1 Phi Phi^T e_j -> e_j
    as lambda -> 0 (p = 548 > N = 8, so Phi Phi^T is invertible): score_j ~ 1 and
    the others ~ 0, whatever the weights. This checks the conditioned train path,
    the store and the TRAK solve end to end.

    The Eq. (3) version (the example's latent as x0_hat at a late step, its caption
    as prompt, K fresh noises) does not hold on these random weights: measured at
    t in {1, 5, 20}, ridge 1e-6 to 1e-1, 2 or 8 train draws, identity or Gaussian
    projection, only 1-3 of the 8 examples rank themselves first (chance is 1).
    An untrained UNet's loss gradient points mostly where the timestep and noise
    draw send it, not where the example does, and the train features average
    draws over all timesteps while the query sits at one. It is checked on trained
    models instead (the bundled digits, tests/test_default_assets.py).
    """
    store, cfg = identity_store
    assert_self_attribution(Scorer(store, [latent_model], "journey", QueryConfig(ridge=1e-6)), cfg, latent_data.latents,
                            CAPTIONS)


def test_store_is_refused_for_another_vae_or_text_encoder(latent_dirs, captioned, identity_store):
    store, cfg = identity_store
    for name in ("other_vae", "other_text"):
        other = load_model(latent_dirs[name])
        with pytest.raises(StoreError, match="weights differ"):
            Scorer(Store.open(store.root), [other])
        with pytest.raises(StoreError, match="checkpoint 0 differs"):
            Store.open(store.root, store_spec([other], captioned, cfg))
    # latents of another VAE are refused as a dataset of this model
    with pytest.raises(ValueError, match="another VAE"):
        featurize([load_model(latent_dirs["a"])], encode_dataset(captioned, load_model(latent_dirs["other_vae"])),
                  store.root.parent / "x", cfg)


def test_workspace_serves_a_latent_pipeline(latent_dirs, caption_folder, tmp_path, monkeypatch):
    """The front-end facade: pixel-size data, prompt-keyed trajectories, decoded baselines."""
    import attribution.workspace as wsmod

    monkeypatch.setattr(wsmod.bundles, "CACHE_DIR", tmp_path / "cache")
    bundle = wsmod.Bundle(
        name="tiny sd", model_dirs=(latent_dirs["a"],), data=str(caption_folder), stores={"loss": tmp_path / "store"},
        featurize=FeaturizeConfig(proj_dim=64, num_draws=1),
    )
    ws = wsmod.Workspace(bundle, device="cpu", query=QueryConfig(num_resamples=2))
    assert ws.pixel_shape == (3, 16, 16) and ws.image_shape == (4, 8, 8) and ws.label(0) == CAPTIONS[0]
    ws.build_store("loss")
    assert len(list((tmp_path / "cache" / "latents").glob("*.npy"))) == 1
    key, traj = ws.generate(0, num_steps=3, prompt="a red square", guidance_scale=2.0)
    key2, _ = ws.generate(0, num_steps=3, prompt="blue stripes", guidance_scale=2.0)
    assert key != key2 and traj.prompt == "a red square"
    mask = np.zeros((16, 16))
    mask[:8] = 1
    assert ws.scores(key, "journey", [1, 2], mask=mask).shape == (2, 8)
    assert ws.scores(key, "baseline-pixel", [1]).shape == (1, 8)


def test_cli_featurizes_a_lora_model_on_its_adapter_only(latent_dirs, caption_folder, tmp_path):
    pytest.importorskip("peft")
    from attribution.cli import main

    trained = load_model(latent_dirs["a"])
    add_lora(trained, rank=2, random_init=True)
    trained.unet.save_lora_adapter(tmp_path / "lora")
    args = ["featurize", "--model", str(latent_dirs["a"]), "--data", str(caption_folder), "--lora", str(tmp_path / "lora"),
            "--store", str(tmp_path / "store"), "--proj-dim", "16", "--num-draws", "1", "--device", "cpu"]
    assert main(args) == 0
    store = Store.open(tmp_path / "store")
    assert store.config.param_filter == ("re:lora_",)
    assert store.manifest["num_params"] == sum(p.numel() for k, p in trained.unet.named_parameters() if "lora_" in k)
    Scorer(store, [trained])  # the store is the LoRA model's
    with pytest.raises(StoreError, match="weights differ"):
        Scorer(store, [load_model(latent_dirs["a"])])  # not the base model's
