"""Influencer grids and the tables over steps: who pushed the sample toward what it became, and against."""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import streamlit as st
from PIL import Image, ImageDraw, ImageFont

from attribution.scoring import top_k
from attribution.workspace import Workspace, short_text

from .images import NEGATIVE_COLOR, NEUTRAL_COLOR, POSITIVE_COLOR, data_uri, framed, img_tag, png_bytes, upscale
from .labels import METHOD_SHORT

Kind = Literal["positive", "negative"]


@dataclass
class Influencers:
    """Top-k training examples of one score row: indices and scores, most extreme first."""

    pos_idx: np.ndarray
    pos_scores: np.ndarray
    neg_idx: np.ndarray
    neg_scores: np.ndarray


def influencers(row: np.ndarray, k: int) -> Influencers:
    """Top-k positive and negative examples of a (N,) score row.

    At most N // 2 each, so that a small training set never shows an example in both grids.
    """
    pos, neg = top_k(row[None], min(k, max(len(row) // 2, 1)))
    return Influencers(pos[0], row[pos[0]], neg[0], row[neg[0]])


def influencer_grid(
    ws: Workspace,
    indices: Sequence[int],
    scores: Sequence[float],
    kind: Kind,
    title: str | None = None,
    subtitle: str | None = None,
    size: int = 96,
    compact: bool = False,
) -> None:
    """Thumbnails framed green (positive) or red (negative) with rank, score, label and index.

    ``compact`` captions show only the score and the index (for narrow rows).
    """
    color = POSITIVE_COLOR if kind == "positive" else NEGATIVE_COLOR
    parts = []
    if title:
        parts.append(
            f"<div style='border-left:6px solid {color};padding:2px 10px;margin:6px 0 10px 0'>"
            f"<span style='font-weight:600;color:{color}'>{title}</span>"
            + (f"<br><span style='color:{NEUTRAL_COLOR};font-size:0.9em'>{subtitle}</span>" if subtitle else "")
            + "</div>"
        )
    if len(indices) == 0:
        parts.append(f"<p style='color:{NEUTRAL_COLOR}'>none</p>")
    else:
        images = ws.train_images(list(indices))
        cells = []
        for r, (im, i, sc) in enumerate(zip(images, indices, scores)):
            i, sc = int(i), float(sc)
            if compact:
                cap = f"{sc:+.2g}<br>idx {i}"
            else:
                label = ws.label(i)
                cap = (f"<b>#{r + 1}</b> {sc:+.3g}<br><span title='{html.escape(label)}'>"
                       f"“{html.escape(short_text(label))}”</span> · idx {i}")
            cells.append(
                f"<figure style='margin:0;width:{size + 8}px;text-align:center'>"
                f"{img_tag(im, size, color, alt=f'training image {i}')}"
                f"<figcaption style='font-size:0.75rem;line-height:1.3;color:#4b5563;margin-top:4px'>{cap}</figcaption>"
                "</figure>"
            )
        spacing = "10px 6px" if compact else "12px 8px"
        parts.append(f"<div class='influencer-grid' style='display:flex;flex-wrap:wrap;gap:{spacing}'>{''.join(cells)}</div>")
    st.markdown(f"<div class='influencer-panel {kind}' style='margin-top:14px'>{''.join(parts)}</div>",
                unsafe_allow_html=True)


PANEL_TEXT = {
    ("positive", False): ("Positive influencers", "make this step's prediction more likely (lower its denoising loss)"),
    ("negative", False): ("Negative influencers", "push this step's prediction away (raise its denoising loss)"),
    ("positive", True): ("Most similar training images", "highest similarity to x̂0 (a baseline, not an influence)"),
    ("negative", True): ("Least similar training images", "lowest similarity to x̂0 (a baseline, not an influence)"),
}


def influencer_panel(ws: Workspace, inf: Influencers, kind: Kind, baseline: bool = False, size: int = 96,
                     title: str | None = None) -> None:
    """The positive or negative grid of ``inf`` with its title and one-line explanation."""
    default_title, subtitle = PANEL_TEXT[(kind, baseline)]
    idx, scores = (inf.pos_idx, inf.pos_scores) if kind == "positive" else (inf.neg_idx, inf.neg_scores)
    influencer_grid(ws, idx, scores, kind, title or default_title, subtitle, size)


def influencer_pair(ws: Workspace, inf: Influencers, baseline: bool = False, size: int = 96, gap: str = "large") -> None:
    """Positive grid and negative grid side by side."""
    left, right = st.columns(2, gap=gap)
    with left:
        influencer_panel(ws, inf, "positive", baseline, size)
    with right:
        influencer_panel(ws, inf, "negative", baseline, size)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType size support
        return ImageFont.load_default()


def influencer_grid_png(
    ws: Workspace,
    inf: Influencers,
    title: str,
    context: Sequence[tuple[str, np.ndarray]] = (),
    size: int = 96,
) -> bytes:
    """A PNG of the two grids (positive row, negative row) with captions, for export.

    ``context``: (caption, uint8 (H, W, C)) images drawn on the left, e.g. x̂0 and the final sample.
    """
    k = max(len(inf.pos_idx), len(inf.neg_idx), 1)
    pad, cap_h, head_h, title_h = 12, 34, 26, 34
    cell_w = size + 8 + pad
    big = size * 2 if context else 0
    left = pad + big + 2 * pad if context else pad
    width = left + k * cell_w
    height = title_h + 2 * (head_h + size + 8 + cap_h) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 8), title, fill="black", font=_font(16))
    slot = (height - title_h - pad) // max(len(context), 1)
    for n, (caption, image) in enumerate(context):
        y_ctx = title_h + 4 + n * slot
        canvas.paste(upscale(image, slot - 24).convert("RGB"), (pad, y_ctx))
        draw.text((pad, y_ctx + slot - 20), caption, fill=NEUTRAL_COLOR, font=_font(12))
    y = title_h
    rows = [("Positive influencers", inf.pos_idx, inf.pos_scores, POSITIVE_COLOR),
            ("Negative influencers", inf.neg_idx, inf.neg_scores, NEGATIVE_COLOR)]
    for name, idx, scores, color in rows:
        draw.text((left, y + 4), name, fill=color, font=_font(14))
        y += head_h
        images = ws.train_images(list(idx)) if len(idx) else []
        for j, (im, i, sc) in enumerate(zip(images, idx, scores)):
            x = left + j * cell_w
            canvas.paste(framed(upscale(im, size), color), (x, y))
            draw.text((x, y + size + 10), f"#{j + 1} {sc:+.3g}", fill="black", font=_font(11))
            draw.text((x, y + size + 23), f"'{ws.label(int(i))}' idx {int(i)}", fill=NEUTRAL_COLOR, font=_font(11))
        y += size + 8 + cap_h
    return png_bytes(canvas)


def top_union(scores: np.ndarray, k: int, max_rows: int = 40) -> tuple[np.ndarray, int]:
    """Training images in the top-k positive or negative of some step, at most ``max_rows`` of them.

    Keeps the ones that make the most top-k lists (ties: the larger peak of |score| relative
    to its step), ordered by the step of their peak. Returns (indices, size of the whole union).
    """
    pos, neg = top_k(scores, k)
    idx, counts = np.unique(np.concatenate([pos.ravel(), neg.ravel()]), return_counts=True)
    rel = np.abs(per_step_normalized(scores[:, idx], scores))
    keep = np.lexsort((-rel.max(0), -counts))[:max_rows]
    idx, rel = idx[keep], rel[:, keep]
    peak = rel.argmax(0)
    return idx[np.lexsort((idx, peak))], len(counts)


def sign_flips(scores: np.ndarray, k: int) -> list[tuple[int, list[int], list[int]]]:
    """Examples in the top-k positive at some step and the top-k negative at another: (idx, pos steps, neg steps)."""
    pos, neg = top_k(scores, k)
    pos_steps: dict[int, list[int]] = {}
    neg_steps: dict[int, list[int]] = {}
    for s in range(scores.shape[0]):
        for i in pos[s]:
            pos_steps.setdefault(int(i), []).append(s)
        for i in neg[s]:
            neg_steps.setdefault(int(i), []).append(s)
    both = sorted(set(pos_steps) & set(neg_steps), key=lambda i: -(len(pos_steps[i]) + len(neg_steps[i])))
    return [(i, pos_steps[i], neg_steps[i]) for i in both]


def per_step_normalized(values: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """``values`` (S, R) divided by each step's largest |score| over all N (display scale in [-1, 1])."""
    scale = np.abs(scores).max(1, keepdims=True)
    return values / np.where(scale > 0, scale, 1.0)


def spearman_table(rows: dict[str, np.ndarray], labels: dict[str, str] = METHOD_SHORT):
    """Spearman correlation between methods' (N,) score vectors, as a pandas DataFrame (short names)."""
    import pandas as pd
    from scipy.stats import rankdata

    names = list(rows)
    ranks = np.stack([rankdata(rows[n]) for n in names])
    corr = np.corrcoef(ranks) if len(names) > 1 else np.ones((1, 1))
    corr = np.round(corr, 2) + 0.0  # no "-0.00"
    short = [labels.get(n, n) for n in names]
    return pd.DataFrame(corr, index=short, columns=short)


def step_ranges(steps: Sequence[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``"1–3, 7"``."""
    out: list[str] = []
    steps = sorted(steps)
    start = prev = steps[0]
    for s in steps[1:] + [None]:
        if s is not None and s == prev + 1:
            prev = s
            continue
        out.append(str(start) if start == prev else f"{start}–{prev}")
        if s is not None:
            start = prev = s
    return ", ".join(out)


def flips_table(ws: Workspace, scores: np.ndarray, k: int, limit: int = 30):
    """DataFrame of training images that are top-k positive at some step and top-k negative at another."""
    import pandas as pd

    rows = []
    for i, pos, neg in sign_flips(scores, k)[:limit]:
        thumb = data_uri(upscale(ws.train_images([i])[0], 48))
        rows.append({"image": thumb, "index": i, "label": ws.label(i),
                     "positive at steps": step_ranges(pos), "negative at steps": step_ranges(neg)})
    return pd.DataFrame(rows, columns=["image", "index", "label", "positive at steps", "negative at steps"])
