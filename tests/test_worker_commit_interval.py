"""`--commit-interval-ms` defaults by guarantee: 1,000 ms at-least-once, 100 ms exactly-once
(where a read_committed reader sees an output only once its transaction commits; the curve that
chose it is in docs/e2e.md, "Exactly-once: the commit interval"). A value given, as a flag or as
`KVREC_WORKER_COMMIT_INTERVAL_MS`, wins under either guarantee."""

from __future__ import annotations

import pytest

from kvrec.stream.cli import build_parser
from kvrec.stream.worker.settings import WorkerSettings

BASE = ["worker", "--metrics-port", "-1"]


def _interval(*flags: str) -> int:
    argv = [*BASE, *flags]
    return WorkerSettings.from_args(build_parser(argv).parse_args(argv)).commit_interval_ms


def test_the_default_interval_follows_the_guarantee() -> None:
    assert _interval() == 1000
    assert _interval("--processing-guarantee", "at-least-once") == 1000
    assert _interval("--processing-guarantee", "exactly-once") == 100


@pytest.mark.parametrize("guarantee", ["at-least-once", "exactly-once"])
@pytest.mark.parametrize("given", [1, 250, 1000, 30_000])
def test_a_given_interval_wins_under_either_guarantee(guarantee: str, given: int,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    assert _interval("--processing-guarantee", guarantee, "--commit-interval-ms", str(given)) == given
    monkeypatch.setenv("KVREC_WORKER_COMMIT_INTERVAL_MS", str(given))
    assert _interval("--processing-guarantee", guarantee) == given


def test_the_help_names_both_defaults() -> None:
    import argparse

    from kvrec.stream.worker.settings import add_worker_arguments

    parser = argparse.ArgumentParser()
    add_worker_arguments(parser)
    (action,) = [a for a in parser._actions if "--commit-interval-ms" in a.option_strings]
    assert "default: 1000 at-least-once, 100 exactly-once" in (action.help or "")
