"""One command-line convention for every script: booleans as ``--flag [True|False]``
(the published style) and ranges checked by argparse, so that a bad value stops before
any work."""
from __future__ import annotations

import argparse
import math


def bool_flag(s: str) -> bool:
    """argparse type for the published `--flag True/False` style (on/off, 1/0, yes/no too)."""
    if s.lower() in {"off", "false", "0", "no"}:
        return False
    if s.lower() in {"on", "true", "1", "yes"}:
        return True
    raise argparse.ArgumentTypeError(f"invalid value {s!r} for a boolean flag (use True or False)")


# keyword arguments of every boolean flag: `--flag` alone means True, `--flag False` off
BOOL = dict(type=bool_flag, nargs="?", const=True, metavar="BOOL")


def int_at_least(low: int):
    """argparse type: an integer >= `low`."""
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {v}")
        return v
    parse.__name__ = f"integer >= {low}"
    return parse


def float_in(low: float, high: float = math.inf, low_open: bool = False):
    """argparse type: a finite float in [low, high] (or (low, high] with `low_open`)."""
    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
        ok = math.isfinite(v) and (v > low if low_open else v >= low) and v <= high
        if not ok:
            bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]"
            raise argparse.ArgumentTypeError(f"must be a finite number in {bounds}, got {s}")
        return v
    parse.__name__ = "number"
    return parse
