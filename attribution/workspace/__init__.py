"""The front door for front ends: a bundle of models, data and stores, its sample recipes and jobs."""

from .workspace import (
    ASSETS_DIR,
    CACHE_DIR,
    DTRAK_STORE_OUTPUTS,
    LRU,
    Bundle,
    Workspace,
    custom_bundle,
    default_bundle,
    mask_key,
)

__all__ = [
    "ASSETS_DIR",
    "Bundle",
    "CACHE_DIR",
    "DTRAK_STORE_OUTPUTS",
    "LRU",
    "Workspace",
    "custom_bundle",
    "default_bundle",
    "mask_key",
]
