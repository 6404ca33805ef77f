"""The front door for front ends: a bundle of models, data and stores, its sample recipes and jobs."""

from .bundles import (
    ASSETS_DIR,
    CACHE_DIR,
    DTRAK_STORE_OUTPUTS,
    Bundle,
    custom_bundle,
    default_bundle,
)
from .jobs import (
    Job,
    JobCancelled,
    JobRunner,
    PriorityLock,
)
from .recipes import (
    DEFAULT_NUM_STEPS,
    SampleRecipe,
    short_text,
)
from .workspace import (
    LRU,
    Workspace,
)

__all__ = [
    "ASSETS_DIR",
    "Bundle",
    "CACHE_DIR",
    "DEFAULT_NUM_STEPS",
    "DTRAK_STORE_OUTPUTS",
    "Job",
    "JobCancelled",
    "JobRunner",
    "LRU",
    "PriorityLock",
    "SampleRecipe",
    "Workspace",
    "custom_bundle",
    "default_bundle",
    "short_text",
]
