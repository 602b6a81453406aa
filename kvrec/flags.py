"""Flag value types that check their range where the flag is defined.

    parser.add_argument("--batch-size", type=integer(1), default=128)
    parser.add_argument("--lr", type=number(above=0), default=1e-3)

A value out of range is refused by argparse itself (`argument --lr: must be a number > 0, got
'-1'`), which the `kvrec` command prints as one line, `kvrec: error: ...`, exit status 2. The
same types parse the flags' environment variables (`stream/cli.py`), so no value escapes its
check whichever way it came in.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def _show(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def _bounds(
    low: float | None, high: float | None, above: float | None = None, below: float | None = None
) -> str:
    parts = []
    if above is not None:
        parts.append(f"> {_show(above)}")
    elif low is not None:
        parts.append(f">= {_show(low)}")
    if below is not None:
        parts.append(f"< {_show(below)}")
    elif high is not None:
        parts.append(f"<= {_show(high)}")
    if low is not None and high is not None and above is None and below is None:
        return f"between {_show(low)} and {_show(high)}"
    return " and ".join(parts) or "(any)"


def integer(low: int | None = None, high: int | None = None) -> Callable[[str], int]:
    """An int in [low, high] (either bound may be open-ended)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except (TypeError, ValueError):
            value = None
        if value is None or (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(
                f"must be an integer {_bounds(low, high)}, got {text!r}"
            )
        return value

    parse.__name__ = "integer"
    return parse


def number(
    low: float | None = None,
    high: float | None = None,
    *,
    above: float | None = None,
    below: float | None = None,
) -> Callable[[str], float]:
    """A finite float in [low, high]; `above` / `below` make a bound exclusive."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except (TypeError, ValueError):
            value = math.nan
        ok = math.isfinite(value)
        ok = ok and (low is None or value >= low) and (high is None or value <= high)
        ok = ok and (above is None or value > above) and (below is None or value < below)
        if not ok:
            raise argparse.ArgumentTypeError(
                f"must be a number {_bounds(low, high, above, below)}, got {text!r}"
            )
        return value

    parse.__name__ = "number"
    return parse


PORT = integer(0, 65_535)
