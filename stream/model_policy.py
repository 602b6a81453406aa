"""The two live-figure decisions of the model lifecycle, as pure functions of the live counters
(stream/model_updates.py `live_hit_rates`):

- may a candidate be promoted (`kvrec models promote --require-live`): it scored at least N
  events as shadow, the serving version at least N while serving, and the candidate's hit rate
  is no worse than the serving version's less a relative margin (0.05: 5 % below it);
- should the serving version be rolled back (`kvrec models guard`): it and its predecessor each
  scored at least N events while serving, its hit rate is below the predecessor's by more than
  a relative margin, and the drop is more than sampling noise: a one-sided two-proportion
  z-test on the live counts (pooled) rejects "no worse" at the given confidence. At a hit rate
  near 1 % an absolute margin of 0.01 could never fire; this fires on 0 hits in 1,000 events
  against 0.92 %, and not on a few hits fewer than expected.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from statistics import NormalDist

from kvrec.stream.model_updates import LiveRate

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


def drop_z(now: LiveRate, before: LiveRate) -> float:
    """How many standard errors `now`'s hit rate lies below `before`'s (pooled two-proportion
    z statistic; 0 when neither has a hit or both hit every time)."""
    if not now.events or not before.events:
        return 0.0
    pooled = (now.hits + before.hits) / (now.events + before.events)
    error = math.sqrt(pooled * (1 - pooled) * (1 / now.events + 1 / before.events))
    return (before.hit_rate - now.hit_rate) / error if error > 0 else 0.0


def promotion_verdict(rates: Mapping[tuple[str, str], LiveRate], candidate: str, serving: str,
                      margin: float, min_events: int) -> Verdict:
    """May `candidate` replace `serving`, judged on live figures? `margin` is relative."""
    shadow = rates.get((candidate, SHADOW)) or _zero(candidate, SHADOW)
    served = rates.get((serving, SERVE)) or _zero(serving, SERVE)
    figures = f"{figure(shadow, candidate, SHADOW)}, {figure(served, serving, SERVE)}"
    if shadow.events < min_events:
        return Verdict(False, f"too few live events to judge: {figures} (need {min_events:,} each)")
    if served.events < min_events:
        return Verdict(False, f"too few live events to judge: {figures} (need {min_events:,} each)")
    floor = served.hit_rate * (1 - margin)
    if shadow.hit_rate < floor:
        return Verdict(False, f"the candidate is worse live: {figures}; it needs at least "
                              f"{floor:.4f} (relative margin {margin:g})")
    return Verdict(True, f"no worse live: {figures} (relative margin {margin:g})")


def rollback_verdict(rates: Mapping[tuple[str, str], LiveRate], serving: str, predecessor: str,
                     margin: float, min_events: int, confidence: float = 0.99) -> Verdict:
    """Has `serving` fallen below `predecessor` (both counted serving) by more than the
    relative `margin`, and by more than sampling noise at `confidence`?"""
    now = rates.get((serving, SERVE)) or _zero(serving, SERVE)
    before = rates.get((predecessor, SERVE)) or _zero(predecessor, SERVE)
    figures = f"{figure(now, serving, SERVE)}, its predecessor {figure(before, predecessor, SERVE)}"
    if now.events < min_events or before.events < min_events:
        return Verdict(False, f"too few live events to judge: {figures} (need {min_events:,} each)")
    z = drop_z(now, before)
    needed = NormalDist().inv_cdf(confidence)
    floor = before.hit_rate * (1 - margin)
    if now.hit_rate < floor and z >= needed:
        return Verdict(True, f"live hit rate fell by {before.hit_rate - now.hit_rate:.4f} "
                             f"(z {z:.2f} >= {needed:.2f}, confidence {confidence:g}; below "
                             f"{floor:.4f}, relative margin {margin:g}): {figures}")
    why = (f"a drop within sampling noise (z {z:.2f} < {needed:.2f}, confidence {confidence:g})"
           if now.hit_rate < floor else f"not below {floor:.4f} (relative margin {margin:g})")
    return Verdict(False, f"within the margin: {why}: {figures}")
