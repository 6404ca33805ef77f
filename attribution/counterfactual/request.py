"""What a counterfactual removes, and the cache key that names its result.

A counterfactual (journey-TRAK Section 4) takes the training images a rule picks for one
sample and step out of the training set, replays the generating checkpoint's training run
without them (coupled retraining, :func:`attribution.models.training.train_ddpm`), and
regenerates the sample from the same noise. The rules, for the scores tau (N,) of the step:

  * ``top``: the k largest scores (the positive influencers; removing them should raise f_t);
  * ``bottom``: the k most negative scores (removing them should lower f_t);
  * ``random``: k images drawn from ``random_seed`` and k only -- the control. The draw does
    not depend on the sample, so one random set (and one retraining) serves every sample;
  * ``class:C``: every training image of class C (k is ignored).

The linear prediction of the change of f_t is the sum of the removed scores (Eq. (5)'s
group form, :mod:`attribution.scoring.groups`). A :class:`CounterfactualRequest` records the
checkpoint (a hash of its weights), the sample, the step, the removed set and the training
and measuring settings; :meth:`CounterfactualRequest.key` hashes all of them, so a result on
disk is reused only for exactly the same question.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..config import TrainConfig
from ..tools.files import sha256_file

__all__ = ["KS", "RULES", "CounterfactualRequest", "checkpoint_hash", "parse_rule", "removed_set", "train_config_of"]

RULES = ("top", "bottom", "random", "class")
#: The removal sizes offered by the app.
KS = (10, 100, 500)


def parse_rule(remove: str) -> tuple[str, int | None]:
    """``"top"``, ``"bottom"``, ``"random"`` -> (rule, None); ``"class:C"`` -> ("class", C)."""
    rule, _, arg = remove.partition(":")
    if rule not in RULES or (rule == "class") != bool(arg):
        raise ValueError(f"--remove must be top, bottom, random or class:C (C a class index), not {remove!r}")
    if rule != "class":
        return rule, None
    try:
        return rule, int(arg)
    except ValueError:
        raise ValueError(f"class:C needs an integer class index, not {arg!r}") from None


def removed_set(remove: str, k: int, scores: np.ndarray, labels: np.ndarray | None = None,
                random_seed: int = 0) -> np.ndarray:
    """Sorted int64 indices of the training images ``remove`` takes out (see module doc).

    Args:
        scores: (N,) scores of the step (unused by ``random``).
        labels: (N,) class labels (``class:C`` only).
    """
    rule, group = parse_rule(remove)
    n = len(scores)
    if rule != "class" and not 0 < k < n:
        raise ValueError(f"k must be between 1 and {n - 1} (the training set has {n} images), not {k}")
    if rule == "top":
        idx = np.argsort(-scores, kind="stable")[:k]
    elif rule == "bottom":
        idx = np.argsort(scores, kind="stable")[:k]
    elif rule == "random":
        idx = np.random.default_rng([int(random_seed), int(k)]).choice(n, size=k, replace=False)
    else:
        if labels is None:
            raise ValueError("class:C needs a training set with class labels")
        idx = np.flatnonzero(np.asarray(labels) == group)
        if len(idx) == 0 or len(idx) == n:
            raise ValueError(f"class {group} has {len(idx)} of the {n} training images; nothing to compare")
    return np.sort(np.asarray(idx, dtype=np.int64))


def checkpoint_hash(model_dir: str | Path) -> str:
    """First 16 hex digits of the sha256 of a checkpoint's UNet weights (names the checkpoint in cache keys)."""
    model_dir = Path(model_dir)
    weights = sorted((model_dir / "unet").glob("*.safetensors")) or sorted((model_dir / "unet").glob("*.bin"))
    if not weights:
        raise FileNotFoundError(f"{model_dir} has no unet weights")
    h = hashlib.sha256()
    for w in weights:
        h.update(sha256_file(w).encode())
    return h.hexdigest()[:16]


def train_config_of(model_dir: str | Path) -> TrainConfig:
    """The :class:`TrainConfig` a checkpoint was trained with (its ``train_config.json``).

    Raises:
        FileNotFoundError: the checkpoint was not trained by ``attribution train`` (no record of its
            run, so there is nothing to replay without the removed images).
    """
    path = Path(model_dir) / "train_config.json"
    if not path.exists():
        raise FileNotFoundError(f"{model_dir} has no train_config.json: a counterfactual replays the checkpoint's "
                                "training run, so it needs a model trained by `attribution train`")
    record = json.loads(path.read_text())
    names = set(TrainConfig.__dataclass_fields__)
    kw = {k: v for k, v in record.items() if k in names}
    if "block_out_channels" in kw:
        kw["block_out_channels"] = tuple(kw["block_out_channels"])
    return TrainConfig(**kw)


def _digest(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:20]


@dataclass(frozen=True)
class CounterfactualRequest:
    """One counterfactual: remove ``removed`` from the training set of checkpoint ``checkpoint`` and regenerate.

    Attributes:
        checkpoint: :func:`checkpoint_hash` of the generating checkpoint.
        sample: the sample's trajectory key (``seed3-ddim50``, ``upload-<sha>-50``; recipes.py).
        step: the step whose scores chose the removals (and whose x0_hat is compared).
        remove: the rule (``top``, ``bottom``, ``random``, ``class:C``).
        k: removal size (``class:C``: the class's size).
        removed: sorted training indices removed.
        method: attribution method whose scores ranked the images.
        train: the replayed training run's settings.
        device: where the retraining runs (``cpu`` or ``cuda``; float rounding differs).
        num_resamples, noise_seed: K and the noises of the measured f_t (Eq. (3)), as the scores'.
        random_seed: seed of the ``random`` draw.
        predicted_delta_f: sum of the removed scores (not part of the key: it follows from the rest).
    """

    checkpoint: str
    sample: str
    step: int
    remove: str
    k: int
    removed: tuple[int, ...]
    method: str = "journey"
    train: TrainConfig = field(default_factory=TrainConfig)
    device: str = "cpu"
    num_resamples: int = 20
    noise_seed: int = 0
    random_seed: int = 0
    predicted_delta_f: float = 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["removed"] = list(self.removed)
        d["train"]["block_out_channels"] = list(self.train.block_out_channels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CounterfactualRequest":
        d = dict(d)
        train = dict(d.pop("train"))
        train["block_out_channels"] = tuple(train["block_out_channels"])
        return cls(**{**d, "removed": tuple(int(i) for i in d["removed"]), "train": TrainConfig(**train)})

    def key(self) -> str:
        """20 hex digits naming the result: a hash of every field but ``predicted_delta_f``."""
        d = self.to_dict()
        d.pop("predicted_delta_f")
        return _digest(d)

    def train_key(self) -> str:
        """20 hex digits naming the retrained model: checkpoint, removed set, training settings and device only,
        so requests of several samples with one removed set (``random``) share one retraining."""
        d = self.to_dict()
        return _digest({k: d[k] for k in ("checkpoint", "removed", "train", "device")})

    def label(self) -> str:
        """``top-100``, ``random-100``, ``class 3 (412 images)``."""
        if self.remove.startswith("class:"):
            return f"class {self.remove[6:]} ({self.k} images)"
        return f"{self.remove}-{self.k}"
