"""The sjlt sketch split by parameter group: per-group train and query features.

For parameter groups g (contiguous column ranges of the flattened gradient, :func:`param_groups`)
and the sketch P of a store, P_g = P[:, g] (the columns of group g), so every feature splits
exactly into per-group parts:

    phi_i = P grad L_i = sum_g P_g grad_g L_i = sum_g phi_{g,i}

The parts are what per-group TRAK scores (:mod:`attribution.scoring.param_groups`) need; their
sum over g is the store's feature (the same P, seed ``proj_seed + m``).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from ..gradients import DrawBatch, GradientTarget, per_step_grads
from ..hooks import hooks_support
from .factorized import example_grads_from_hooks
from .sjlt import SparseSignProjector

__all__ = ["GroupedSketch", "ParamGroup", "block_of", "param_groups"]


@dataclass(frozen=True)
class ParamGroup:
    """A parameter group: columns [start, stop) of the flattened gradient (parameter order)."""

    name: str
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def block_of(name: str) -> str:
    """The default group of UNet parameter ``name``: its top-level module, down and up blocks by index
    (``down_blocks.0``, ...); the output norm joins ``conv_out`` (the output head)."""
    parts = name.split(".")
    if parts[0] in ("down_blocks", "up_blocks"):
        return ".".join(parts[:2])
    return "conv_out" if parts[0] == "conv_norm_out" else parts[0]


def param_groups(params: Mapping[str, torch.Tensor | Sequence[int]], group_of=block_of) -> list[ParamGroup]:
    """The groups of ``params`` (name -> tensor or shape, in gradient order) under ``group_of`` (name -> group name).

    Raises:
        ValueError: a group's parameters are not contiguous in gradient order.
    """
    out: list[ParamGroup] = []
    col = 0
    for name, p in params.items():
        g = group_of(name)
        n = p.numel() if isinstance(p, torch.Tensor) else math.prod(p)
        if out and out[-1].name == g:
            out[-1] = ParamGroup(g, out[-1].start, col + n)
        elif any(o.name == g for o in out):
            raise ValueError(f"group {g!r} is not contiguous in the parameter order (at {name})")
        else:
            out.append(ParamGroup(g, col, col + n))
        col += n
    return out


class GroupedSketch:
    """An sjlt sketch P split by parameter group: gradients -> (G, d) parts P_g grad_g.

    Offers the ``accumulate_columns`` / ``row_block`` / ``dim_out`` interface that
    :func:`~attribution.features.projection.factorized.example_grads_from_hooks` feeds, with
    ``dim_out = G * d``: rows [g d, (g + 1) d) of its accumulator hold group g. ``base`` must have
    been built with the parameters' shapes (every parameter, hence every group, starts a block).
    """

    def __init__(self, base: SparseSignProjector, groups: list[ParamGroup]):
        if not groups or groups[0].start != 0 or groups[-1].stop != base.dim_in or any(
                a.stop != b.start for a, b in zip(groups, groups[1:])):
            raise ValueError("the groups must tile the projector's input columns")
        self.base, self.groups = base, groups
        self.d = base.dim_out
        self.dim_out = len(groups) * self.d
        self._starts = [g.start for g in groups]
        self.row_block = base.row_block

    def accumulate_columns(self, part: torch.Tensor, start: int, acc_t: torch.Tensor) -> None:
        """``acc_t[g d:(g + 1) d] += P[:, start:stop] @ part.T`` for the group g holding columns [start, stop).

        part: (B, stop - start); acc_t: (G d, B), updated."""
        g = bisect.bisect_right(self._starts, start) - 1
        if start + part.shape[1] > self.groups[g].stop:
            raise ValueError(f"columns [{start}, {start + part.shape[1]}) cross the end of group {self.groups[g].name}")
        self.base.accumulate_columns(part, start, acc_t[g * self.d : (g + 1) * self.d])

    def project_groups(self, grads: torch.Tensor) -> torch.Tensor:
        """(B, P) full gradients -> (B, G, d) per-group projections (their sum over G is ``base.project``)."""
        acc = torch.zeros(self.dim_out, grads.shape[0], device=grads.device)
        for g in self.groups:
            self.accumulate_columns(grads[:, g.start : g.stop], g.start, acc)
        return self._split(acc)

    def _split(self, acc_t: torch.Tensor) -> torch.Tensor:
        """(G d, B) accumulator -> (B, G, d)."""
        return acc_t.T.reshape(acc_t.shape[1], len(self.groups), self.d).contiguous()

    def example_features(self, target: GradientTarget, batch: DrawBatch, chunk_size: int = 32) -> torch.Tensor:
        """(B, G, d) per-group train features of the draw-averaged output (hooks; each layer projected as formed).

        Raises:
            ValueError: the model has layers the hooks do not cover (:func:`~attribution.features.hooks.hooks_support`).
        """
        if not hooks_support(target.model, target.params):
            raise ValueError("per-group train features need layers the per-example hooks cover")
        rows = example_grads_from_hooks(target.model, target.params, target.output, batch.x0, batch.timesteps,
                                        batch.noises, chunk_size, batch.cond, projector=self)  # (B, G d)
        return self._split(rows.T)

    def step_features(self, target: GradientTarget, batch: DrawBatch) -> torch.Tensor:
        """(S, G, d) per-group Eq. 3 query features (plain backward per step, as the Scorer's queries)."""
        return self.project_groups(per_step_grads(target.model, target.params, target.output, batch.x0,
                                                  batch.timesteps, batch.noises, batch.mask, batch.cond))
