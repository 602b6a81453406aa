"""The two live-figure decisions of the model lifecycle, as pure functions of the live counters
(stream/model_updates.py `live_hit_rates`):

- may a candidate be promoted (`kvrec models promote --require-live`): it scored at least N
  events as shadow, the serving version at least N while serving, and the candidate's hit rate
  is no worse than the serving version's minus an absolute margin;
- should the serving version be rolled back (`kvrec models guard`): it and its predecessor each
  scored at least N events while serving, and its hit rate is below the predecessor's minus an
  absolute margin.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from stream.model_updates import LiveRate

SERVE, SHADOW = "serve", "shadow"


@dataclass(frozen=True)
class Verdict:
    yes: bool  # promote / roll back
    reason: str  # one line with both figures (or what is missing)


def figure(rate: LiveRate | None, version: str, role: str) -> str:
    """`v2 (shadow) 0.0421 over 5,000 events`."""
    if rate is None or not rate.events:
        return f"{version} ({role}) has no live events"
    return f"{version} ({role}) {rate.hit_rate:.4f} over {rate.events:,} events"


def _zero(version: str, role: str) -> LiveRate:
    return LiveRate(version, role, 0, 0)


def promotion_verdict(rates: Mapping[tuple[str, str], LiveRate], candidate: str, serving: str,
                      margin: float, min_events: int) -> Verdict:
    """May `candidate` replace `serving`, judged on live figures?"""
    shadow = rates.get((candidate, SHADOW)) or _zero(candidate, SHADOW)
    served = rates.get((serving, SERVE)) or _zero(serving, SERVE)
    figures = f"{figure(shadow, candidate, SHADOW)}, {figure(served, serving, SERVE)}"
    if shadow.events < min_events:
        return Verdict(False, f"too few live events to judge: {figures} (need {min_events:,} each)")
    if served.events < min_events:
        return Verdict(False, f"too few live events to judge: {figures} (need {min_events:,} each)")
    floor = served.hit_rate - margin
    if shadow.hit_rate < floor:
        return Verdict(False, f"the candidate is worse live: {figures}; it needs at least "
                              f"{floor:.4f} (margin {margin:g})")
    return Verdict(True, f"no worse live: {figures} (margin {margin:g})")


def rollback_verdict(rates: Mapping[tuple[str, str], LiveRate], serving: str, predecessor: str,
                     margin: float, min_events: int) -> Verdict:
    """Has `serving` fallen by more than `margin` below `predecessor`, both counted serving?"""
    now = rates.get((serving, SERVE)) or _zero(serving, SERVE)
    before = rates.get((predecessor, SERVE)) or _zero(predecessor, SERVE)
    figures = f"{figure(now, serving, SERVE)}, its predecessor {figure(before, predecessor, SERVE)}"
    if now.events < min_events or before.events < min_events:
        return Verdict(False, f"too few live events to judge: {figures} (need {min_events:,} each)")
    if now.hit_rate < before.hit_rate - margin:
        return Verdict(True, f"live hit rate fell by {before.hit_rate - now.hit_rate:.4f}, more "
                             f"than the margin {margin:g}: {figures}")
    return Verdict(False, f"within the margin {margin:g}: {figures}")
