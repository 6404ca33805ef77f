"""Counterfactual evaluation: LDS per step, retrain-without-top-k, reports (``attribution bench``)."""
