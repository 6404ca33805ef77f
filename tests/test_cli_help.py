"""The CLI's flags: help text on every flag of the core commands, defaults and help from the config dataclasses."""

from __future__ import annotations

import argparse

from attribution.cli import build_parser
from attribution.config import FeaturizeConfig, QueryConfig, SamplingConfig, TrainConfig, setting_help
from attribution.features import METHODS
from attribution.scoring.baselines import BASELINE_METHODS


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def _option(parser: argparse.ArgumentParser, flag: str) -> argparse.Action:
    return next(a for a in parser._actions if flag in a.option_strings)


def test_every_flag_of_the_core_commands_has_help():
    commands = _subparsers(build_parser())
    missing = [(name, a.option_strings) for name, sub in commands.items() if name != "bench"
               for a in sub._actions if a.option_strings and a.dest != "help" and not a.help]
    assert missing == []
    assert set(commands) >= {"train", "featurize", "attribute", "build-assets", "doctor"}


def test_flags_take_defaults_and_help_from_the_settings():
    commands = _subparsers(build_parser())
    featurize, attribute, train = commands["featurize"], commands["attribute"], commands["train"]
    assert _option(featurize, "--proj-dim").default == FeaturizeConfig.proj_dim
    assert _option(featurize, "--proj-dim").help == setting_help(FeaturizeConfig, "proj_dim") == "projection dimension d."
    assert _option(featurize, "--projection").choices == ["sjlt", "block-sjlt", "gaussian", "identity", "factorized"]
    assert _option(attribute, "--ridge").default == QueryConfig.ridge
    assert _option(attribute, "--guidance-scale").default == SamplingConfig.guidance_scale == 7.5
    assert _option(train, "--block-out-channels").default == list(TrainConfig.block_out_channels)
    method = _option(attribute, "--method")
    assert method.choices == [*METHODS, *BASELINE_METHODS] and all(name in method.help for name in method.choices)
