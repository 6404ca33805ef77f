"""Counterfactuals in the app and the CLI: remove the influencers, retrain, regenerate (journey-TRAK Section 4).

:mod:`.request` says what is removed and names the result; :mod:`.run` retrains (coupled,
resumable per epoch), regenerates from the same noise, measures and writes the result;
:mod:`.showcase` lists the bundled, precomputed examples.
"""

from .request import KS, RULES, CounterfactualRequest, checkpoint_hash, parse_rule, removed_set, train_config_of
from .run import (
    IMAGES,
    CounterfactualResult,
    discard_work,
    find_result,
    interrupted,
    load_result,
    retrain,
    run_counterfactual,
    write_result,
)

__all__ = [
    "IMAGES",
    "KS",
    "RULES",
    "CounterfactualRequest",
    "CounterfactualResult",
    "checkpoint_hash",
    "discard_work",
    "find_result",
    "interrupted",
    "load_result",
    "parse_rule",
    "removed_set",
    "retrain",
    "run_counterfactual",
    "train_config_of",
    "write_result",
]
