"""Subset designs of the counterfactual benchmark: which training rows each retrained model keeps.

Three designs, each a pure function of its seed:

- ``stratified`` (D-TRAK's protocol): every subset keeps ``fraction`` of each class. It holds
  the class make-up fixed, so its truth measures *within-class* effects only.
- ``dirichlet``: the class make-up varies, the size does not. Subset j draws class
  proportions ``p_j ~ Dirichlet(alpha 1_C)`` and shares its ``round(fraction * N)`` rows
  among the classes in proportion to ``p_j`` (a class holds at most all of its rows; the
  excess goes to the others), chosen at random within each class. A subset may hold much
  more or much less of the class (and of the styles) a sample depends on, so a method must
  predict class-level as well as within-class effects; with the size fixed, "more data"
  explains none of the truth.
- ``groups`` (group counterfactuals): subset g keeps everything but group g. The groups
  are the C classes, then ``clusters_per_class`` style clusters inside each class (k-means
  of the digit classifier's embeddings). With these subsets the datamodel prediction is
  ``const + sum_{i in G} tau[i]``: the LDS across groups is the Spearman correlation of the
  summed score of the removed group with the retrained model's output.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

SUBSET_DESIGNS = ("stratified", "dirichlet", "groups")


def stratified_choice(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Bool mask keeping ``round(fraction * n_c)`` random rows of every class c."""
    return class_fraction_choice(labels, {c: fraction for c in np.unique(labels)}, rng)


def class_fraction_choice(labels: np.ndarray, fractions: dict, rng: np.random.Generator) -> np.ndarray:
    """Bool mask keeping ``round(fractions[c] * n_c)`` random rows of every class c."""
    keep = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        keep[rng.choice(rows, size=int(round(fractions[c] * len(rows))), replace=False)] = True
    return keep


def dirichlet_subsets(labels: np.ndarray, num_subsets: int, fraction: float, alpha: float,
                      rng: np.random.Generator) -> np.ndarray:
    """(m, N) bool: subsets whose class proportions are drawn from ``Dirichlet(alpha 1_C)``."""
    classes, sizes = np.unique(labels, return_counts=True)
    total = int(round(fraction * len(labels)))
    out = []
    for _ in range(num_subsets):
        counts = capped_allocation(rng.dirichlet(np.full(len(classes), alpha)), sizes, total)
        out.append(class_fraction_choice(labels, dict(zip(classes, counts / sizes)), rng))
    return np.stack(out)


def capped_allocation(p: np.ndarray, caps: np.ndarray, total: int) -> np.ndarray:
    """Integer counts (C,) summing to ``total``, proportional to ``p`` where below ``caps`` (water-filling)."""
    counts = np.zeros(len(p), dtype=np.int64)
    open_ = np.ones(len(p), dtype=bool)
    while counts.sum() < total and open_.any():
        room = total - counts.sum()
        share = np.where(open_, p, 0.0)
        share = share / share.sum() if share.sum() > 0 else open_ / open_.sum()
        add = np.minimum(np.floor(share * room).astype(np.int64), caps - counts)
        if add.sum() == 0:  # rounding left a few rows: give them one by one to the largest open shares
            add[np.argmax(np.where(open_ & (counts < caps), share, -1))] = 1
        counts += add
        open_ &= counts < caps
    return counts


def kmeans(x: np.ndarray, k: int, rng: np.random.Generator, iters: int = 50) -> np.ndarray:
    """Lloyd's k-means with k-means++ seeding: (n, D) float -> (n,) cluster ids in [0, k)."""
    x = np.asarray(x, dtype=np.float64)
    centres = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        d2 = np.min([((x - c) ** 2).sum(1) for c in centres], axis=0)
        centres.append(x[rng.choice(len(x), p=d2 / d2.sum())])
    centres = np.stack(centres)
    ids = np.zeros(len(x), dtype=int)
    for _ in range(iters):
        ids_new = ((x[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
        if _ and np.array_equal(ids_new, ids):
            break
        ids = ids_new
        for j in range(k):
            if (ids == j).any():
                centres[j] = x[ids == j].mean(0)
    return ids


def style_groups(labels: np.ndarray, embeddings: np.ndarray, clusters_per_class: int,
                 rng: np.random.Generator) -> list[np.ndarray]:
    """Style clusters within each class: a list of (N,) bool group masks, class by class."""
    groups = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        ids = kmeans(embeddings[rows], clusters_per_class, rng)
        for j in range(clusters_per_class):
            g = np.zeros(len(labels), dtype=bool)
            g[rows[ids == j]] = True
            if g.any():
                groups.append(g)
    return groups


def group_masks(labels: np.ndarray, embeddings: np.ndarray, clusters_per_class: int,
                rng: np.random.Generator) -> np.ndarray:
    """(G, N) bool group masks: the classes, then the style clusters of each class."""
    classes = [labels == c for c in np.unique(labels)]
    return np.stack(classes + style_groups(labels, embeddings, clusters_per_class, rng))


def design_subsets(
    design: str,
    labels: np.ndarray,
    num_subsets: int,
    fraction: float,
    seed: int,
    alpha: float = 1.0,
    clusters_per_class: int = 2,
    embed: Callable[[], np.ndarray] | None = None,
) -> np.ndarray:
    """(m, N) bool subset masks of ``design`` (for ``groups``: m = C + C * clusters_per_class, ``num_subsets`` unused).

    ``embed``: called (only for ``groups``) to get (N, D) embeddings of the training images.
    """
    rng = np.random.default_rng([seed, 4242])
    if design == "stratified":
        return np.stack([stratified_choice(labels, fraction, rng) for _ in range(num_subsets)])
    if design == "dirichlet":
        return dirichlet_subsets(labels, num_subsets, fraction, alpha, rng)
    if design == "groups":
        if embed is None:
            raise ValueError("the groups design needs embeddings of the training images")
        return ~group_masks(labels, embed(), clusters_per_class, rng)
    raise ValueError(f"unknown subset design {design!r}; choose one of {SUBSET_DESIGNS}")


def classifier_embeddings(images: np.ndarray) -> np.ndarray:
    """(N, D) embeddings of uint8 (N, s, s) digits by the bundled classifier (resized to 32x32)."""
    from .scores import classifier_embed

    x = torch.from_numpy(images).float().div(127.5).sub(1).unsqueeze(1)
    embed = classifier_embed()
    with torch.no_grad():
        return torch.cat([embed(x[i : i + 512]) for i in range(0, len(x), 512)]).numpy()
