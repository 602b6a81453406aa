"""The `kvrec models` actions that change what serves: publish, promote, shadow, rollback,
and the guard that rolls back on its own when the live hit rate falls
(stream/lifecycle/policy.py decides; each change is a new announcement)."""

from __future__ import annotations

import logging
import sys
import time

from kvrec.errors import ConfigError, KvrecError, RunFailed
from kvrec.model.store import StoredVersion
from kvrec.stream.kafka_config import KafkaUnreachable
from kvrec.stream.lifecycle.announcements import Announcement, Candidate, first_announcement
from kvrec.stream.lifecycle.models_context import Context, named_versions, summary_metrics
from kvrec.stream.lifecycle.policy import promotion_verdict, rollback_verdict
from kvrec.stream.logs import setup_logging

log = logging.getLogger("kvrec.models")


def run_publish(context: Context) -> int:
    args = context.args
    from kvrec.model.artifact import load_artifact

    load_artifact(args.artifact)  # refuse a corrupted artifact before asking Kafka anything
    announcement = None
    known = True
    if args.serve or args.shadow:
        announcement = context.state()  # no broker: exit 1 before the store is touched
        if args.shadow and announcement is None:
            raise context.nothing_serves()
    else:
        try:
            announcement = context.state()
        except KafkaUnreachable as exc:
            known = False
            print(f"warning: not pruned, the serving state is unknown: {exc}", file=sys.stderr)
    entry = context.store.publish(args.artifact)
    print(f"stored {entry.version} in {entry.path}")
    if args.serve or args.shadow:
        context.verified(entry.version)  # the copy, as readers will see it (a mounted bucket)
    if args.serve:
        if announcement is not None and announcement.version == entry.version:
            print(f"{entry.version} already serves")
        else:
            announcement = _serve(context, announcement, entry, "promote" if announcement else "publish")
    elif args.shadow:
        assert announcement is not None
        if announcement.version == entry.version:
            raise ConfigError(f"{entry.version} serves: it cannot shadow itself")
        based_on = announcement
        announcement = announcement.with_shadow(
            Candidate(entry.version, str(entry.path.resolve()), entry.manifest_sha256, args.sample))
        context.announce(announcement, based_on)
        print(f"announced: {entry.version} shadows {announcement.version} "
              f"on {args.sample:.0%} of users")
    if known:
        deleted = context.store.prune(args.keep, named_versions(announcement) | {entry.version})
        if deleted:
            print(f"pruned {len(deleted)} version(s): {', '.join(deleted)}")
    return 0


def _serve(context: Context, announcement: Announcement | None, entry: StoredVersion,
           reason: str, note: str = "", *, say: bool = True) -> Announcement:
    location, metrics = str(entry.path.resolve()), summary_metrics(entry.metrics)
    if announcement is None:
        new = first_announcement(context.store.model_name, entry.version, location,
                                 entry.manifest_sha256, reason, metrics, note)
    elif reason in ("rollback", "auto_rollback"):
        new = announcement.rolled_back(entry.version, location, entry.manifest_sha256, reason,
                                       metrics=metrics, note=note)
    else:
        new = announcement.serving(entry.version, location, entry.manifest_sha256, reason,
                                   metrics=metrics, note=note, served=context.served())
    context.announce(new, announcement)
    if say:
        served = context.served() if announcement else None
        never = served is not None and announcement is not None and announcement.version not in served
        was = (f" (was {announcement.version}{', which no worker served' if never else ''})"
               if announcement else "")
        print(f"announced: {entry.version} serves{was}, reason {reason}")
    return new


def run_promote(context: Context) -> int:
    args = context.args
    entry = context.verified(args.version)
    announcement = context.state()
    if announcement is not None and announcement.version == entry.version:
        if not context.current_reports() or context.serving_now(announcement) == entry.version:
            raise ConfigError(f"{entry.version} already serves")
        # announced, but no worker serves it (refused, e.g. a folder half-copied, since
        # repaired): a new announcement of it, which the workers try again
        print(f"{entry.version} is announced but no worker serves it: announcing it again")
    note = ""
    if args.require_live:
        if announcement is None:
            raise RunFailed(f"cannot judge {entry.version} live: nothing serves yet")
        verdict = promotion_verdict(context.live_rates(), entry.version,
                                    context.serving_now(announcement),
                                    args.live_margin, args.min_live_events)
        if not verdict.yes:
            raise RunFailed(f"not promoting {entry.version}: {verdict.reason}")
        note = verdict.reason
        print(f"live check passed: {verdict.reason}")
    _serve(context, announcement, entry, "promote", note)
    return 0


def run_shadow(context: Context) -> int:
    args = context.args
    if args.stop == (args.version is not None):
        raise ConfigError("give a VERSION to shadow, or --stop (not both)")
    if args.stop:
        announcement = context.required_state()
        if announcement.shadow is None:
            print(f"no shadow candidate for model {context.store.model_name}: nothing to stop")
            return 0
        context.announce(announcement.with_shadow(None, note=f"{announcement.shadow.version} stopped"),
                         announcement)
        print(f"announced: {announcement.shadow.version} no longer shadows")
        return 0
    entry = context.verified(args.version)
    announcement = context.required_state()
    if announcement.version == entry.version:
        raise ConfigError(f"{entry.version} serves: it cannot shadow itself")
    candidate = Candidate(entry.version, str(entry.path.resolve()), entry.manifest_sha256, args.sample)
    context.announce(announcement.with_shadow(candidate), announcement)
    print(f"announced: {entry.version} shadows {announcement.version} on {args.sample:.0%} of users")
    return 0


def run_rollback(context: Context) -> int:
    args = context.args
    announcement = context.required_state()
    if not announcement.history:
        raise ConfigError(f"nothing to roll back to: no version served model "
                          f"{context.store.model_name!r} before {announcement.version} (the "
                          "history is empty: every earlier one was rolled back from, refused "
                          "or never served)")
    target = args.to or announcement.history[0]
    if target not in announcement.history:
        raise ConfigError(f"{target} is not in the rollback history "
                          f"({', '.join(announcement.history)}); use `kvrec models promote`")
    entry = context.verified(target)
    _serve(context, announcement, entry, "rollback", f"rolled back from {announcement.version}")
    return 0


def guard_once(context: Context) -> tuple[bool, str]:
    """Check once; roll back if the serving version fell too far. Returns (rolled back, why)."""
    args = context.args
    context.forget_live()  # the guard's loop reads the workers' newest reports every check
    announcement = context.state()
    if announcement is None:
        return False, f"no rollback: nothing announced for model {context.store.model_name!r}"
    serving = context.serving_now(announcement)  # what the workers serve, announced or not
    predecessor = predecessor_of(serving, announcement)
    if predecessor is None:
        return False, f"no rollback: {serving} has no predecessor to compare with"
    verdict = rollback_verdict(context.live_rates(), serving, predecessor,
                               args.margin, args.min_live_events, args.confidence)
    if not verdict.yes:
        return False, f"no rollback: {verdict.reason}"
    entry = context.verified(predecessor)
    note = f"automatic rollback from {serving}: {verdict.reason}"
    _serve(context, announcement, entry, "auto_rollback", note, say=False)
    return True, f"rolled back {serving} to {predecessor}: {verdict.reason}"


def predecessor_of(serving: str, announcement: Announcement) -> str | None:
    """The version that served before `serving`: the next one of the history when `serving`
    is in it (the announced version was refused and an older one serves), else the newest."""
    history = announcement.history
    if serving in history:
        place = history.index(serving) + 1
        return history[place] if place < len(history) else None
    return history[0] if history else None


def run_guard(context: Context) -> int:
    args = context.args
    setup_logging(args)
    if args.once:
        print(guard_once(context)[1])
        return 0
    log.info("guarding model %s every %g s (relative margin %g, confidence %g, at least %d "
             "live events)", context.store.model_name, args.interval_s, args.margin,
             args.confidence, args.min_live_events)
    while True:
        try:
            rolled_back, decision = guard_once(context)
            log.log(logging.WARNING if rolled_back else logging.INFO, "%s", decision)
        except KvrecError as exc:  # an unreachable broker, a corrupted predecessor: try again
            log.error("%s", exc)
        time.sleep(args.interval_s)


