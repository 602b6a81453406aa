"""Progress bars on a terminal, and nothing but the callers' own lines everywhere else.

Every kvrec progress bar (training batches, replay, index build and tuning, benchmarks) comes
from `progress_bar`. On a terminal it is a tqdm bar. Where the bar's stream (stderr) is not a
terminal (CI, `nohup`, container logs, a file) it is disabled: tqdm would otherwise write every
update as a line of its own (a 30-epoch training run left about 10,800 of them). There the
callers' one line per epoch or phase (`progress_line`) is the whole record.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress_bar(iterable: Iterable[T] | None = None, *, enabled: bool = True, **kwargs: Any) -> tqdm:
    """A tqdm bar when `enabled` and stderr is a terminal; a silent stand-in otherwise."""
    # disable=None: tqdm disables the bar when its stream is not a terminal
    return tqdm(iterable, disable=None if enabled else True, **kwargs)


def progress_line(text: str) -> None:
    """One line on stdout that does not break a bar being drawn (`tqdm.write`)."""
    tqdm.write(text)
