"""Display names of the methods and stores, read from the core's registries."""

from __future__ import annotations

from attribution.features import METHODS
from attribution.scoring import BASELINE_NOTES
from attribution.workspace import DTRAK_STORE_OUTPUTS

#: Store (train output) -> what the Compare page calls it.
DTRAK_OUTPUTS = {"square": "D-TRAK, ||ε||²", "l1": "D-TRAK, L1 norm", "l2": "D-TRAK, L2 norm", "mean": "D-TRAK, mean"}
assert tuple(DTRAK_OUTPUTS) == DTRAK_STORE_OUTPUTS

#: Method name -> one line saying what it is (the app's methods and the baselines).
METHOD_BLURBS = {**{n: m.blurb for n, m in METHODS.items() if m.blurb},
                 **{f"baseline-{k}": blurb for k, (_, blurb) in BASELINE_NOTES.items()}}

#: Method name -> short name for table headers and legends.
METHOD_SHORT = {**{n: m.short for n, m in METHODS.items() if m.short},
                **{f"baseline-{k}": short for k, (short, _) in BASELINE_NOTES.items()}}
