"""Settings, one dataclass per concern.

Every field of :class:`FeaturizeConfig` changes the stored features, so the whole
dataclass is written into the store manifest and compared when a store is
reopened. :class:`QueryConfig` holds the settings of a query (they change the
scores, not the store), and :class:`SamplingConfig` those of a trajectory.
Defaults are sized for the bundled digit models on a 2-core CPU.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from enum import Enum
from typing import Any

#: Names of the model-output functions, see :mod:`attribution.features.outputs`.
TRAIN_OUTPUTS = ("loss", "square", "l1", "l2", "mean")

#: Default relative ridge: lambda = DEFAULT_RIDGE * trace(Phi^T Phi) / d.
DEFAULT_RIDGE = 1e-2


class ProjectionKind(str, Enum):
    """The kinds of random projection (:mod:`attribution.features.projection`); values are the names used in
    settings, store manifests and the CLI."""

    SJLT = "sjlt"
    BLOCK_SJLT = "block-sjlt"
    GAUSSIAN = "gaussian"
    IDENTITY = "identity"
    FACTORIZED = "factorized"


#: Values of ``FeaturizeConfig.proj_kind``.
PROJECTION_KINDS = tuple(k.value for k in ProjectionKind)

#: Fixed-point refinements per DDIM inversion step of an upload (:mod:`attribution.sampling.inversion`).
INVERSION_REFINE_ITERS = 5

def setting_help(cls: type, name: str) -> str:
    """Help text of setting ``name`` of the dataclass ``cls``, for the CLI's flags.

    A field's ``metadata["help"]`` if it has one, else its entry in the class docstring
    (``name: text`` under ``Attributes:`` or any other indented list), whitespace collapsed.
    """
    for f in fields(cls):
        if f.name == name and "help" in f.metadata:
            return f.metadata["help"]
    entries: dict[str, list[str]] = {}
    current = None
    for line in (cls.__doc__ or "").splitlines():
        head, sep, rest = line.strip().partition(": ")
        indent = len(line) - len(line.lstrip())
        if sep and head.replace("_", "").replace(" / ", "").isalnum() and indent <= 8:
            for key in head.split(" / "):
                entries[key] = current = [rest]
        elif current is not None and line.strip() and indent > 8:
            current.append(line.strip())
        else:
            current = None
    if name not in entries:
        raise KeyError(f"{cls.__name__}.{name} has no help text")
    return " ".join(" ".join(entries[name]).replace("``", "").split())


#: Values of ``FeaturizeConfig.timestep_sampling``.
TIMESTEP_SAMPLINGS = ("auto", "stratified", "log-stratified", "uniform", "even")

#: Values of ``FeaturizeConfig.draw_sharing``.
DRAW_SHARINGS = ("per-example", "common")


@dataclass(frozen=True)
class FeaturizeConfig:
    """How train features ``phi_i = P grad_theta E_{t,eps} f(theta; x_i, t, eps)`` are built.

    Attributes:
        output: model-output function applied at train examples; ``"loss"`` is the
            DDPM training loss (journey-TRAK, Algorithm 1 line 3), the others are the
            D-TRAK choices (``"square"`` = ||eps_theta||^2, ...).
        proj_dim: projection dimension d.
        proj_kind: ``"sjlt"`` (sparse sign sketch, default: never materializes a
            dense matrix), ``"gaussian"`` (dense N(0, 1/d), generated blockwise) or
            ``"identity"`` (no projection; d = number of parameters; for exact tests)
            or ``"factorized"`` (per-layer Kronecker Gaussian computed without
            per-example gradients, :mod:`attribution.features.projection.factorized`)
            or ``"block-sjlt"`` (an sjlt sketch of each parameter group -- the UNet's
            blocks -- into its own slice of the d coordinates, so a store also holds
            per-group features: what the ``journey-groups`` method scores,
            :mod:`attribution.features.projection.block_sjlt`).
        proj_seed: seed of the projection of checkpoint 0; checkpoint m uses
            ``proj_seed + m`` (a fresh matrix per checkpoint, Algorithm 1 line 6).
        sjlt_nnz: non-zeros per input coordinate of the sparse sketch.
        num_draws: (timestep, noise) draws averaged per train example.
        timestep_sampling: ``"auto"`` (default: ``"log-stratified"`` for the ``loss``
            output of journey-TRAK, ``"stratified"`` for the D-TRAK outputs: what gave
            each the higher LDS in the evaluation benchmark; a store records the
            resolved value), ``"stratified"`` (one uniform draw in each of
            ``num_draws`` equal strata of [0, T)), ``"log-stratified"`` (strata of
            equal width in log(t + T/200): denser at small t, where the loss gradient
            changes fastest with t; what makes late-step self-attribution work, see
            :func:`attribution.features.featurize.log_strata`), ``"uniform"`` or ``"even"``
            (D-TRAK's ``range(0, T, T // num_draws)``).
        timestep_range: ``(lo, hi)``: take the draws from ``[lo, hi)`` instead of
            ``[0, T)`` (strata, even grid or uniform draws within it). ``(t, t + 1)``
            puts every draw at timestep t: train features matched to one sampling
            step (the timestep ablation of the evaluation benchmark).
        draw_seed: seed of the draws; example i always gets the same draws,
            whatever the chunking, sharding or device.
        draw_sharing: ``"per-example"`` (each example draws its own (timestep, noise)
            pairs from ``(draw_seed, i)``) or ``"common"`` (common random numbers: every
            example gets the same D pairs, drawn from ``draw_seed`` alone). Shared
            draws remove the noise-draw variance from the *differences* between
            examples' gradients, which is what the scores rank (the estimator is
            unchanged: each phi_i is still an unbiased D-draw average).
        param_filter: parameters to differentiate (``None``: all): name prefixes, or
            regular expressions written ``"re:<pattern>"`` (searched in the name), e.g.
            ``("re:lora_",)`` for LoRA adapter weights; see
            :func:`attribution.features.gradients.param_matcher`.
        store_dtype: dtype of the stored features (``"float32"`` or ``"float16"``).
    """

    output: str = "loss"
    proj_dim: int = 2048
    proj_kind: str = "sjlt"
    proj_seed: int = 0
    sjlt_nnz: int = 4
    num_draws: int = 4
    timestep_sampling: str = "auto"
    timestep_range: tuple[int, int] | None = None
    draw_seed: int = 0
    param_filter: tuple[str, ...] | None = None
    store_dtype: str = "float16"
    draw_sharing: str = "per-example"

    def __post_init__(self) -> None:
        if self.output not in TRAIN_OUTPUTS:
            raise ValueError(f"unknown output {self.output!r}; choose one of {TRAIN_OUTPUTS}")
        if self.proj_kind not in PROJECTION_KINDS:
            raise ValueError(f"unknown proj_kind {self.proj_kind!r}; choose one of {PROJECTION_KINDS}")
        if self.timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(f"unknown timestep_sampling {self.timestep_sampling!r}")
        if self.draw_sharing not in DRAW_SHARINGS:
            raise ValueError(f"unknown draw_sharing {self.draw_sharing!r}; choose one of {DRAW_SHARINGS}")
        if self.store_dtype not in ("float32", "float16"):
            raise ValueError(f"store_dtype must be float32 or float16, not {self.store_dtype!r}")
        if self.num_draws < 1 or self.proj_dim < 1 or self.sjlt_nnz < 1:
            raise ValueError("num_draws, proj_dim and sjlt_nnz must be positive")
        if self.param_filter is not None:
            object.__setattr__(self, "param_filter", tuple(self.param_filter))
        if self.timestep_range is not None:
            lo, hi = (int(v) for v in self.timestep_range)
            if not 0 <= lo < hi:
                raise ValueError(f"timestep_range must be (lo, hi) with 0 <= lo < hi, not {self.timestep_range!r}")
            object.__setattr__(self, "timestep_range", (lo, hi))

    @property
    def effective_timestep_sampling(self) -> str:
        """``timestep_sampling`` with ``"auto"`` resolved for this output."""
        if self.timestep_sampling != "auto":
            return self.timestep_sampling
        return "log-stratified" if self.output == "loss" else "stratified"

    def resolved(self) -> "FeaturizeConfig":
        """This config with ``"auto"`` settings replaced by what they mean (what a store records)."""
        return replace(self, timestep_sampling=self.effective_timestep_sampling)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["param_filter"] = list(self.param_filter) if self.param_filter is not None else None
        d["timestep_range"] = list(self.timestep_range) if self.timestep_range is not None else None
        if self.draw_sharing == "per-example":  # recorded only when set: stores built before it existed still match
            del d["draw_sharing"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FeaturizeConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown featurize settings {sorted(unknown)}")
        d = dict(d)
        if d.get("param_filter") is not None:
            d["param_filter"] = tuple(d["param_filter"])
        if d.get("timestep_range") is not None:
            d["timestep_range"] = tuple(d["timestep_range"])
        return cls(**d)


@dataclass(frozen=True)
class QueryConfig:
    """How query features ``g_t = P grad_theta f_t(theta)`` (Eq. 3) and scores are built.

    Attributes:
        num_resamples: K, fresh noises averaged in Eq. (3) (paper: 20).
        noise_seed: seed of the K noises; step s uses ``(noise_seed, s)``.
        ridge: relative ridge; lambda_m = ridge * trace(K_m) / d.
        chunk_size: steps per call of the query-gradient routine (plain autograd: one
            backward of K rows per step; factorized stores: one batched backward of
            ``chunk_size * K`` rows); bounds the memory of a query, not its result.
    """

    num_resamples: int = 20
    noise_seed: int = 0
    ridge: float = DEFAULT_RIDGE
    chunk_size: int = 10

    def __post_init__(self) -> None:
        if self.num_resamples < 1:
            raise ValueError("num_resamples must be at least 1")
        if not math.isfinite(self.ridge) or self.ridge < 0:
            raise ValueError(f"ridge must be a finite non-negative number, not {self.ridge}")


@dataclass(frozen=True)
class SamplingConfig:
    """How a trajectory is sampled: scheduler kind, number of steps, seed.

    Attributes:
        num_inference_steps: sampling steps S.
        scheduler: ``"ddim"`` (deterministic given the seed's initial noise) or ``"ddpm"``.
        seed: seed of the initial noise (and of DDPM's per-step noise).
        eta: DDIM's eta (0: deterministic).

    Text-conditional models also use:
        prompt: the text the sample is conditioned on (``""``: unconditional).
        negative_prompt: the text of the unconditional branch of guidance (usually ``""``).
        guidance_scale: s of classifier-free guidance,
            ``eps = eps_uncond + s (eps_cond - eps_uncond)``; at s <= 1 only the
            conditional branch runs (as in diffusers). Ignored by unconditional models.
    """

    num_inference_steps: int = 50
    scheduler: str = "ddim"
    seed: int = 0
    eta: float = 0.0
    prompt: str = ""
    negative_prompt: str = ""
    guidance_scale: float = 7.5

    def __post_init__(self) -> None:
        if self.scheduler not in ("ddim", "ddpm"):
            raise ValueError(f"scheduler must be 'ddim' or 'ddpm', not {self.scheduler!r}")
        if self.num_inference_steps < 1:
            raise ValueError("num_inference_steps must be at least 1")
        if self.guidance_scale < 0:
            raise ValueError("guidance_scale must be non-negative")


@dataclass(frozen=True)
class TrainConfig:
    """DDPM training settings (used for the bundled ensemble and LDS retraining)."""

    epochs: int = field(default=40, metadata={"help": "passes over the training set"})
    batch_size: int = field(default=64, metadata={"help": "examples per optimizer step"})
    lr: float = field(default=2e-3, metadata={"help": "Adam learning rate"})
    ema_decay: float = field(default=0.995, metadata={"help": "decay of the weights' exponential moving average "
                                                              "(the saved model)"})
    seed: int = field(default=0, metadata={"help": "seed of the initialization, shuffling, timesteps and noises"})
    block_out_channels: tuple[int, ...] = field(default=(16, 32, 32),
                                                metadata={"help": "channels of the UNet's resolution levels"})
    layers_per_block: int = field(default=1, metadata={"help": "ResNet layers per UNet block"})
    num_train_timesteps: int = field(default=1000, metadata={"help": "T of the noise schedule"})
    extra: dict[str, Any] = field(default_factory=dict)
