"""Command-line pieces both demos share: argparse types for the numbers they take, the help formatter, and the
thread-count context."""
from __future__ import annotations

import argparse
import math

import torch


def _number(kind, low, strict, what, high=None):
    """An argparse type: a `kind` number >= low (> low when `strict`), and < high when given."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if (not math.isfinite(value) or value < low or (strict and value == low)
                or (high is not None and value >= high)):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value
    return parse


weight = _number(float, 0.0, False, "a weight >= 0")
positive = _number(float, 0.0, True, "a number > 0")
count = _number(int, 1, False, "an integer >= 1")
count0 = _number(int, 0, False, "an integer >= 0")
open_unit = _number(float, 0.0, True, "a number in the open interval (0, 1)", high=1.0)


def listed(parse):
    """The argparse type of a comma list whose every item `parse` accepts (a list of its values)."""
    def parse_list(text):
        values = [parse(item.strip()) for item in text.split(",") if item.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"expected a comma list, got {text!r}")
        if len(set(values)) != len(values):
            raise argparse.ArgumentTypeError(f"a value is listed twice in {text!r}")
        return values
    return parse_list


def seed_list(text: str, parser: argparse.ArgumentParser) -> list:
    """--seeds, a comma list of integers, as a list (a usage error through `parser` otherwise)."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds expects a comma list of integers, got {text!r}")
    if not seeds:
        parser.error("--seeds is empty")
    return seeds


class Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except where they depend on --dataset (None) or are flags (False)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


class Threads:
    """torch.set_num_threads(n) for the duration of a run (n = 0: unchanged), then restored."""

    def __init__(self, n):
        self.n, self.saved = n, torch.get_num_threads()

    def __enter__(self):
        if self.n:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.saved)
