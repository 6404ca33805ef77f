"""Images for display: upscaling, frames, PNG and data URIs, the trajectory strip, the mask from a canvas drawing."""

from __future__ import annotations

import base64
import html
import io

import numpy as np
import streamlit as st
from PIL import Image

from attribution.data import model_to_uint8
from attribution.sampling import Trajectory
from attribution.scoring.masks import mask_from_selection

from .state import sample_label

POSITIVE_COLOR = "#1a9850"


NEGATIVE_COLOR = "#d73027"


NEUTRAL_COLOR = "#6b7280"


def upscale(image: np.ndarray, size: int) -> Image.Image:
    """uint8 (H, W, C) -> PIL image of ``size`` px on its long side, nearest neighbour (crisp pixels)."""
    arr = image[..., 0] if image.shape[-1] == 1 else image
    img = Image.fromarray(arr)
    scale = size / max(img.size)
    return img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.NEAREST)


def tensor_image(x, size: int) -> Image.Image:
    """A model-space image (C, H, W) in [-1, 1] -> upscaled PIL image."""
    return upscale(model_to_uint8(x[None])[0], size)


def framed(img: Image.Image, color: str, width: int = 4) -> Image.Image:
    """``img`` inside a coloured frame (the green / red accent of influencer grids)."""
    out = Image.new("RGB", (img.width + 2 * width, img.height + 2 * width), color)
    out.paste(img.convert("RGB"), (width, width))
    return out


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def data_uri(img: Image.Image) -> str:
    """PNG data URI of an image (for image columns in tables)."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(img)).decode("ascii")


def img_tag(image: np.ndarray, size: int, border: str | None = None, alt: str = "") -> str:
    """An ``<img>`` of a uint8 (H, W, C) image inlined as PNG and scaled by the browser with crisp pixels.

    Inline images need no extra request per rerun, which keeps scrubbing fast.
    """
    arr = image[..., 0] if image.shape[-1] == 1 else image
    style = (f"width:{size}px;height:{size}px;max-width:none;object-fit:fill;image-rendering:pixelated;"
             "display:block;border-radius:3px")
    if border:
        style += f";border:4px solid {border};box-sizing:content-box"
    return f"<img src='{data_uri(Image.fromarray(arr))}' alt='{html.escape(alt)}' style='{style}'/>"


def trajectory_images(traj: Trajectory, step: int, size: int = 192) -> None:
    """x_t, x̂0 and the final sample side by side, large and crisp."""
    cols = st.columns(3, gap="medium")
    latent = traj.decoded_x0_hat is not None
    panels = [
        (traj.display_x_t[step], "Noisy input x_t",
         "the noisy latent the model sees (channels 1–3 as colours)" if latent else "what the model sees at this step"),
        (traj.display_x0_hat[step], "One-step prediction x̂0",
         "the model's guess of the final image from x_t" + (", decoded by the VAE" if latent else "")),
        (traj.display_sample, "Final sample", f"where the trajectory ends · {sample_label()}"),
    ]
    for col, (x, title, sub) in zip(cols, panels):
        col.markdown(
            f"<div><b>{title}</b><br><span style='color:{NEUTRAL_COLOR}'>{html.escape(sub)}</span>"
            f"<div style='margin-top:10px'>{img_tag(model_to_uint8(x[None])[0], size, alt=title)}</div></div>",
            unsafe_allow_html=True,
        )


def canvas_to_mask(rgba: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray | None:
    """A canvas drawing (H', W', 4) -> (H, W) mask in [0, 1]: painted (alpha > 0) = 1, area-averaged
    (:func:`~attribution.scoring.masks.mask_from_selection`, soft).

    Returns None when nothing is painted.
    """
    if rgba is None or rgba.ndim != 3 or rgba.shape[-1] < 4:
        return None
    return mask_from_selection(rgba[..., 3], shape, soft=True)


def mask_overlay(sample: np.ndarray, mask: np.ndarray, size: int, color: tuple[int, int, int] = (255, 170, 0)) -> Image.Image:
    """The sample (H, W, C) uint8 with the mask tinted on top, upscaled (for a preview)."""
    base = sample[..., 0] if sample.shape[-1] == 1 else sample.mean(-1)
    rgb = np.repeat(base[..., None], 3, -1).astype(np.float32)
    a = 0.55 * mask[..., None]
    rgb = rgb * (1 - a) + np.array(color, np.float32) * a
    return upscale(rgb.round().astype(np.uint8), size)


def sample_uint8(traj: Trajectory) -> np.ndarray:
    """The final sample as uint8 (H, W, C) (decoded for latent models)."""
    return model_to_uint8(traj.display_sample[None])[0]
