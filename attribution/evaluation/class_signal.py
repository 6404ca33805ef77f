"""Class signal of attributions on a labelled training set (journey-TRAK Section 5.2, Figure 3).

For a generated sample whose class (by the digit classifier) is c, and the scores
tau_s (N,) of step s:

- ``top_pos_share[s]``: share of the top-k positive influencers whose label is c;
- ``top_neg_share[s]``: the same for the k most negative;
- ``class_sums[s]`` (C,): the summed score of each class, sum_{i: y_i = j} tau_s[i]: the
  group influence a leave-one-class-out counterfactual predicts; ``argmax_is_class[s]``
  says whether class c has the largest sum.

Chance for the shares is the class's share of the training set (about 10 % on digits).
No score is re-ranked or blended here: the shares are read off each method's own scores.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..scoring.groups import class_share_over_steps

#: Timesteps at which the issue's class measures are reported (50-step DDIM: 980 - 20 s).
REPORT_TIMESTEPS = (980, 740, 480, 240, 80, 0)

Log = Callable[[str], None]


@dataclass(frozen=True)
class ClassSignalSpec:
    """Which samples and steps the class measures use.

    Attributes:
        num_samples: generated samples (seeds ``seed_offset + i``).
        seed_offset: first seed; validation runs (choosing settings) use another offset
            than reported runs, so no reported sample chooses a setting.
        timesteps: scheduler timesteps of the measured steps.
        top_k: k of the top-k shares.
        num_inference_steps: DDIM steps of each sample.
    """

    num_samples: int = 50
    seed_offset: int = 0
    timesteps: tuple[int, ...] = REPORT_TIMESTEPS
    top_k: int = 8
    num_inference_steps: int = 50

    @property
    def seeds(self) -> list[int]:
        return [self.seed_offset + i for i in range(self.num_samples)]


def class_measures(scores: np.ndarray, labels: np.ndarray, sample_class: int, top_k: int,
                   num_classes: int) -> dict[str, np.ndarray]:
    """The class measures of one sample.

    Args:
        scores: (S, N) scores of S steps.
        labels: (N,) int class of every training example.
        sample_class: c, the sample's class.

    Returns:
        {"top_pos_share": (S,), "top_neg_share": (S,), "class_sums": (S, C), "argmax_is_class": (S,) bool}.
    """
    pos_share, neg_share = class_share_over_steps(scores, labels, sample_class, top_k)
    sums = np.stack([scores[:, labels == j].sum(1) for j in range(num_classes)], axis=1)
    return {
        "top_pos_share": pos_share,
        "top_neg_share": neg_share,
        "class_sums": sums,
        "argmax_is_class": sums.argmax(1) == sample_class,
    }


@dataclass
class ClassSignalResult:
    """Class measures of one method over the samples: arrays (P, S) (``class_sums``: (P, S, C))."""

    method: str
    timesteps: list[int]
    sample_classes: list[int]
    sample_confidence: list[float]
    top_pos_share: np.ndarray
    top_neg_share: np.ndarray
    argmax_is_class: np.ndarray
    class_sums: np.ndarray
    seconds: float = 0.0
    settings: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """Means over samples per step (and their standard errors), JSON-ready."""
        p = len(self.sample_classes)

        def mean_se(x: np.ndarray) -> tuple[list[float], list[float]]:
            x = x.astype(np.float64)
            return x.mean(0).tolist(), (x.std(0, ddof=1) / np.sqrt(p)).tolist() if p > 1 else [0.0] * x.shape[1]

        pos, pos_se = mean_se(self.top_pos_share)
        neg, neg_se = mean_se(self.top_neg_share)
        arg, arg_se = mean_se(self.argmax_is_class)
        return {"method": self.method, "timesteps": self.timesteps, "num_samples": p, "settings": self.settings,
                "top_pos_share": pos, "top_pos_share_se": pos_se, "top_neg_share": neg, "top_neg_share_se": neg_se,
                "argmax_is_class": arg, "argmax_is_class_se": arg_se, "seconds": self.seconds}


def steps_of_timesteps(timesteps: torch.Tensor, wanted: Sequence[int]) -> list[int]:
    """Step indices of a trajectory whose timesteps are ``wanted`` (ValueError if one is missing)."""
    ts = timesteps.tolist()
    missing = [t for t in wanted if t not in ts]
    if missing:
        raise ValueError(f"timesteps {missing} are not steps of this schedule ({ts[0]} .. {ts[-1]})")
    return [ts.index(t) for t in wanted]


def measure_class_signal(
    score_fn: Callable[[object, list[int]], np.ndarray],
    trajectories: Sequence,
    labels: np.ndarray,
    classify: Callable[[torch.Tensor], torch.Tensor],
    spec: ClassSignalSpec,
    method: str,
    num_classes: int = 10,
    settings: dict | None = None,
) -> ClassSignalResult:
    """Class measures of one method over ``trajectories``.

    Args:
        score_fn: (trajectory, steps) -> scores (S, N).
        classify: images (B, C, H, W) in [-1, 1] -> class probabilities (B, num_classes).
    """
    t0 = time.perf_counter()
    rows = {k: [] for k in ("top_pos_share", "top_neg_share", "argmax_is_class", "class_sums")}
    classes, conf = [], []
    for traj in trajectories:
        steps = steps_of_timesteps(traj.timesteps, spec.timesteps)
        prob = classify(traj.sample[None])[0]
        c = int(prob.argmax())
        classes.append(c)
        conf.append(float(prob[c].detach()))
        for k, v in class_measures(score_fn(traj, steps), labels, c, spec.top_k, num_classes).items():
            rows[k].append(v)
    return ClassSignalResult(method=method, timesteps=list(spec.timesteps), sample_classes=classes,
                             sample_confidence=conf, seconds=time.perf_counter() - t0, settings=settings or {},
                             **{k: np.stack(v) for k, v in rows.items()})


MEASURES = (("top_pos_share", "top-k positive share"), ("top_neg_share", "top-k negative share"),
            ("argmax_is_class", "class sum is max"))

#: What journey-TRAK's Section 5.2 leads one to expect of a working method on digits, as the product's targets.
TARGETS = ("Targets: the top-8 positive influencers share the sample's class in ≥ 60 % of cases at t ≤ 240 and "
           "≥ 35 % at t = 480; the sample's class has the largest summed score in ≥ 80 % of samples at t ≤ 480. "
           "Chance is about 10 %.")


def summary_rows(results: Sequence[dict]) -> list[dict]:
    """Per method and measure: one "mean ± se" cell (in %) per timestep."""
    rows = []
    for r in results:
        for key, name in MEASURES:
            row = {"method": r["method"], "measure": name}
            row.update({f"t={t}": f"{100 * v:.0f} ± {100 * s:.0f}"
                        for t, v, s in zip(r["timesteps"], r[key], r[key + "_se"])})
            rows.append(row)
    return rows


def summary_table(results: Sequence[dict]) -> str:
    """Markdown table: per method and timestep, top-k positive share, negative share, argmax rate (in %)."""
    rows = summary_rows(results)
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    return "\n".join(lines + ["| " + " | ".join(r[k] for k in keys) + " |" for r in rows])


def load_class_signal_results(directory: Path) -> dict[str, dict]:
    """{name: result} of the ``class_signal_*.json`` files written by ``bench class-signal`` in ``directory``
    (lab files of other scripts, without ``summaries``, are skipped)."""
    out = {}
    for path in sorted(directory.glob("class_signal_*.json")):
        result = json.loads(path.read_text())
        if "summaries" in result:
            out[path.stem.removeprefix("class_signal_")] = result
    return out


def spec_dict(spec: ClassSignalSpec) -> dict:
    d = asdict(spec)
    d["timesteps"] = list(spec.timesteps)
    return d
