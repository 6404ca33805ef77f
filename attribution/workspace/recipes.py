"""Sample recipes: how a trajectory is made, and the cache key that names it.

A :class:`SampleRecipe` is either a generated sample (a seed; with a prompt and a guidance
scale for text-conditional models) or an uploaded image (its bytes, inverted by DDIM;
conditioned on a prompt for text-conditional models). :meth:`SampleRecipe.key` is the
workspace's cache key of its trajectory, the only place these keys are built. Front ends
keep a recipe between requests in its plain form (:meth:`SampleRecipe.to_state`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Literal

from ..config import SamplingConfig

__all__ = ["SampleRecipe"]

#: Sampling steps of the app's trajectories (generated and inverted).
DEFAULT_NUM_STEPS = 50


@dataclass(frozen=True)
class SampleRecipe:
    """How to make one trajectory (see module doc).

    Attributes:
        kind: ``"seed"`` (generate) or ``"upload"`` (invert an image).
        seed: the sampling seed (``"seed"``).
        name: the upload's display name, already made safe (``"upload"``).
        data: the upload's encoded bytes (``"upload"``).
        prompt: text-conditional models: the prompt; None for unconditional models.
        guidance_scale: classifier-free guidance scale of a generated conditional sample
            (uploads are inverted without guidance: 1.0).
        num_steps, scheduler: the sampling schedule.
    """

    kind: Literal["seed", "upload"]
    seed: int = 0
    name: str = ""
    data: bytes = b""
    prompt: str | None = None
    guidance_scale: float | None = None
    num_steps: int = DEFAULT_NUM_STEPS
    scheduler: str = "ddim"

    def __post_init__(self) -> None:
        if self.kind not in ("seed", "upload"):
            raise ValueError(f"unknown sample kind {self.kind!r}")

    @classmethod
    def generated(cls, seed: int, prompt: str | None = None, guidance_scale: float | None = None) -> "SampleRecipe":
        """Seed ``seed``; ``prompt`` (conditional models) with ``guidance_scale`` (default: the sampling default)."""
        scale = None if prompt is None else float(guidance_scale if guidance_scale is not None
                                                  else SamplingConfig.guidance_scale)
        return cls("seed", seed=int(seed), prompt=prompt, guidance_scale=scale)

    @classmethod
    def uploaded(cls, data: bytes, name: str, prompt: str | None = None) -> "SampleRecipe":
        """An uploaded image (``name`` already safe for display), conditioned on ``prompt`` (conditional models)."""
        return cls("upload", name=name, data=bytes(data), prompt=prompt, guidance_scale=None if prompt is None else 1.0)

    def key(self, conditional: bool) -> str:
        """The trajectory's cache key; ``conditional``: the models take a prompt (it is part of the key)."""
        prompt = self.prompt or ""
        if self.kind == "seed":
            key = f"seed{self.seed}-{self.scheduler}{self.num_steps}"
            if conditional:
                scale = self.guidance_scale if self.guidance_scale is not None else SamplingConfig.guidance_scale
                key += "-" + hashlib.sha256(f"{scale}|{prompt}".encode()).hexdigest()[:12]
            return key
        key = "upload-" + hashlib.sha256(self.data).hexdigest()[:16] + f"-{self.num_steps}"
        if prompt:
            key += "-" + hashlib.sha256(prompt.encode()).hexdigest()[:12]
        return key

    def label(self, prompt_chars: int = 60) -> str:
        """Short description, e.g. ``seed 3`` or ``upload seven.png`` (and the prompt, shortened)."""
        label = f"seed {self.seed}" if self.kind == "seed" else f"upload {self.name}"
        if self.prompt is not None:
            label += f" · “{short_text(self.prompt, prompt_chars)}”"
        return label

    def to_state(self) -> dict[str, Any]:
        """The plain form kept in a front end's session: ``{"kind": "seed", "seed": 3}`` etc. (prompt fields only
        for conditional samples; default schedule fields left out)."""
        out: dict[str, Any] = ({"kind": "seed", "seed": self.seed} if self.kind == "seed"
                               else {"kind": "upload", "name": self.name, "data": self.data})
        if self.prompt is not None:
            out.update(prompt=self.prompt, guidance_scale=self.guidance_scale)
        if self.num_steps != DEFAULT_NUM_STEPS:
            out["num_steps"] = self.num_steps
        if self.scheduler != "ddim":
            out["scheduler"] = self.scheduler
        return out

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "SampleRecipe":
        """Inverse of :meth:`to_state`."""
        return cls(**state)


def short_text(text: str, limit: int = 48) -> str:
    """``text`` on one line, cut to ``limit`` characters with an ellipsis."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"
