"""Guards for paths and names that reach the file system or the page from a front end's inputs.

Audit of the app's inputs (see the README's "Reliability" section): uploads are
decoded in memory and never written, and their file names are only displayed
(through :func:`safe_name`); method, step, seed and mask widgets choose among
fixed options; no widget takes a path. What the app writes (stores built from
the Compare page, cached latents) goes to paths from its configuration (the
bundle, ``$ATTRIBUTION_CACHE``), and :func:`resolve_within` keeps those inside the
configured directories even when a link or a ``..`` in them points elsewhere.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from typing import Iterable

MAX_NAME = 80
_UNSAFE = re.compile(r"[^A-Za-z0-9._ ()+-]")


class PathEscapeError(ValueError):
    """A path resolves outside the directories it is allowed in."""


def resolve_within(path: str | Path, roots: Iterable[str | Path]) -> Path:
    """``path`` resolved (links and ``..`` followed) if it lies inside one of ``roots``.

    Raises:
        PathEscapeError: it resolves outside every root.
    """
    roots = [Path(r).resolve() for r in roots]
    resolved = Path(path).resolve()
    if any(resolved == r or resolved.is_relative_to(r) for r in roots):
        return resolved
    raise PathEscapeError(
        f"{path} resolves to {resolved}, outside the configured directories "
        f"({', '.join(str(r) for r in roots)}); refusing to use it"
    )


def safe_name(name: str, default: str = "upload") -> str:
    """A display-safe file name: the last path component, letters, digits and ``._ ()+-`` only.

    Keeps markdown, HTML and control characters of a user's file name out of the
    page and any directory part out of paths.
    """
    base = re.split(r"[/\\]", unicodedata.normalize("NFKC", str(name)))[-1]
    base = _UNSAFE.sub("_", base).strip(" .")
    if len(base) > MAX_NAME:
        stem, dot, ext = base.rpartition(".")
        base = (stem[: MAX_NAME - len(ext) - 2] + "_." + ext) if dot and len(ext) <= 8 else base[:MAX_NAME]
    return base or default
