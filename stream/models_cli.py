"""`kvrec models`: inspect the model store and choose what serves.

    kvrec models list [--json]                        # stored versions, what serves, its shadow
    kvrec models show VERSION [--json]                # manifest, metrics, config, state, live figures
    kvrec models publish DIR [--serve | --shadow [--sample F]] [--keep N]
    kvrec models promote VERSION [--require-live [--live-margin M] [--min-live-events N]]
    kvrec models shadow VERSION [--sample F] | kvrec models shadow --stop
    kvrec models rollback [--to VERSION]
    kvrec models guard [--once] [--margin M] [--confidence C] [--min-live-events N] [--interval-s S]

The store (model/store.py) holds the versions; the newest record of the compacted
`model-updates` topic (stream/model_updates.py) says which one should serve, which one shadows
and what served before; the workers' reports on the stats topic say what does serve (a worker
refuses a version that fails a check and keeps the one it serves). `list` shows both; the
rollback history holds only versions a worker reported serving; `promote --require-live` and
`guard` judge the version the workers serve. Every change is a new record on the updates
topic; a refusal announces nothing. A version is checked before it is announced: it is in the
store and every file's sha256 matches its manifest. Every action but `publish` refuses a
--model-store folder that does not exist, as the worker does.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from kvrec.errors import ArtifactError, ConfigError, KvrecError, RunFailed
from kvrec.flags import integer, number
from kvrec.model.store import ModelStore, StoredVersion
from kvrec.stream.cli import COMMAND_GROUP
from kvrec.stream.kafka_config import KafkaUnreachable, add_kafka_arguments, client_config, topic_names
from kvrec.stream.logs import add_logging_arguments, setup_logging
from kvrec.stream.model_policy import SERVE, SHADOW, figure, promotion_verdict, rollback_verdict
from kvrec.stream.model_updates import (
    LIVE_STATS_TOPIC,
    UPDATES_TOPIC,
    Announcement,
    Candidate,
    LiveRate,
    LiveView,
    WorkerReport,
    announce,
    ensure_model_topics,
    first_announcement,
    latest_announcement,
    read_live,
)

log = logging.getLogger("kvrec.models")
READ_TIMEOUT_S = 30.0  # reading a topic from a broker that answered
SUMMARY_KEYS = ("test", "validation", "popularity_test", "best_epoch", "users")

ACTIONS = {
    "list": "every stored version, what is announced, what the workers serve, the history",
    "show": "one version: manifest, metrics, model config, state and live hit rate",
    "publish": "copy a trained artifact into the store, optionally serve or shadow it, prune",
    "promote": "make a stored version serve (optionally only if it is no worse live)",
    "shadow": "set (or --stop) the candidate that scores a sample of live events unpublished",
    "rollback": "serve the version that served before again (again: the one before that)",
    "guard": "roll back automatically when the serving version's live hit rate falls",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    actions = {name: sub.add_parser(name, help=text, description=text)
               for name, text in ACTIONS.items()}
    for action_parser in actions.values():
        _add_shared_arguments(action_parser)

    actions["list"].add_argument("--json", action="store_true", help="one JSON document")
    show = actions["show"]
    show.add_argument("version", metavar="VERSION")
    show.add_argument("--json", action="store_true", help="one JSON document")

    publish = actions["publish"]
    publish.add_argument("artifact", metavar="ARTIFACT_DIR", help="a `kvrec train --out` folder")
    role = publish.add_mutually_exclusive_group()
    role.add_argument("--serve", action="store_true", help="announce it as the serving version")
    role.add_argument("--shadow", action="store_true", help="announce it as the shadow candidate")
    publish.add_argument("--sample", type=number(above=0, high=1), default=0.1,
                         help="with --shadow: the share of users the candidate scores")
    publish.add_argument("--keep", type=integer(1), default=5,
                         help="keep the newest N versions (never one the announcement names: "
                              "serving, shadow, rollback history); not pruned when Kafka "
                              "cannot be reached")

    promote = actions["promote"]
    promote.add_argument("version", metavar="VERSION")
    promote.add_argument("--require-live", action="store_true",
                         help="refuse unless the candidate, as shadow, and the version the "
                              "workers serve each scored at least --min-live-events live events "
                              "and the candidate's hit rate is at least the serving one's less "
                              "--live-margin of it")
    promote.add_argument("--live-margin", type=number(0, 1), default=0.0,
                         help="relative hit-rate margin (0.05 = a hit rate 5%% below the serving "
                              "one's is still accepted)")
    promote.add_argument("--min-live-events", type=integer(1), default=1000,
                         help="with --require-live: live events each version must have scored")

    shadow = actions["shadow"]
    shadow.add_argument("version", metavar="VERSION", nargs="?")
    shadow.add_argument("--stop", action="store_true", help="end the shadow candidate")
    shadow.add_argument("--sample", type=number(above=0, high=1), default=0.1,
                        help="the share of users the candidate scores")

    rollback = actions["rollback"]
    rollback.add_argument("--to", metavar="VERSION", default=None,
                          help="a version of the rollback history (default: the newest one)")

    guard = actions["guard"]
    guard.add_argument("--once", action="store_true", help="check once, print the decision, exit")
    guard.add_argument("--interval-s", type=number(above=0), default=60.0,
                       help="seconds between two checks")
    guard.add_argument("--margin", type=number(0, 1), default=0.05,
                       help="relative hit-rate margin: roll back when the serving version's live "
                            "hit rate is below its predecessor's less this share of it (0.05: "
                            "5%% below) and the drop is beyond sampling noise (--confidence)")
    guard.add_argument("--confidence", type=number(above=0.5, below=1), default=0.99,
                       help="one-sided confidence that the drop is not sampling noise "
                            "(two-proportion z-test on the live counts)")
    guard.add_argument("--min-live-events", type=integer(1), default=1000,
                       help="live events each of the two versions must have scored serving")
    add_logging_arguments(guard)


def _add_shared_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(COMMAND_GROUP)
    group.add_argument("--model-store", default="models", help="the store's root folder")
    group.add_argument("--model-name", default="default", help="the model (a folder of the store)")
    group.add_argument("--updates-topic", default=UPDATES_TOPIC,
                       help="compacted topic of the announcements")
    group.add_argument("--stats-topic", default=LIVE_STATS_TOPIC,
                       help="compacted topic of the workers' live counters and reports")
    group.add_argument("--report-max-age-s", type=number(above=0), default=60.0,
                       help="a worker whose newest report is older is not counted as serving "
                            "(workers report every --stats-interval-ms)")
    add_kafka_arguments(parser)


@dataclass
class Context:
    args: argparse.Namespace
    store: ModelStore
    kafka: dict[str, object]
    _live: LiveView | None = None

    def state(self) -> Announcement | None:
        """The newest announcement of the model (None: none yet); `KafkaUnreachable` (exit 1)
        when no broker answers within --connect-timeout."""
        if self.args.updates_topic not in topic_names(self.kafka, self.args.connect_timeout):
            return None
        return latest_announcement(self.kafka, self.store.model_name, self.args.updates_topic,
                                   READ_TIMEOUT_S)

    def required_state(self) -> Announcement:
        announcement = self.state()
        if announcement is None:
            raise self.nothing_serves()
        return announcement

    def nothing_serves(self) -> ConfigError:
        return ConfigError(
            f"nothing serves model {self.store.model_name!r} yet ({self.args.updates_topic} "
            "has no announcement of it): `kvrec models publish DIR --serve` first"
        )

    def live(self) -> LiveView:
        """The workers' newest reports and counters (read once per command)."""
        if self._live is None:
            if self.args.stats_topic not in topic_names(self.kafka, self.args.connect_timeout):
                self._live = LiveView({}, [])
            else:
                self._live = read_live(self.kafka, self.store.model_name, self.args.stats_topic,
                                       READ_TIMEOUT_S)
        return self._live

    def forget_live(self) -> None:
        self._live = None

    def live_rates(self) -> dict[tuple[str, str], LiveRate]:
        return self.live().rates

    def current_reports(self) -> list[WorkerReport]:
        return self.live().current(self.args.report_max_age_s)

    def served(self) -> set[str] | None:
        """The versions workers reported serving; None when no worker reports (unknown)."""
        view = self.live()
        return view.ever_served() if view.reporting() else None

    def serving_now(self, announcement: Announcement) -> str:
        """The version the workers serve (the announced one when none reported lately);
        refused (exit 1) while they serve different versions (a swap under way)."""
        versions = sorted({r.status.serving for r in self.current_reports() if r.status})
        if not versions:
            return announcement.version
        if len(versions) > 1:
            raise RunFailed(f"the workers of model {self.store.model_name!r} serve different "
                            f"versions ({', '.join(versions)}): a swap is under way, try again")
        return versions[0]

    def verified(self, version: str) -> StoredVersion:
        """The stored version, after every file's sha256 was checked against its manifest."""
        from kvrec.model.artifact import load_artifact

        stored = self.store.get(version)
        load_artifact(stored.path)  # ArtifactError naming the file that does not match
        return stored

    def announce(self, announcement: Announcement, based_on: Announcement | None) -> None:
        """Publish `announcement`, decided from `based_on`; refused (exit 1) if another
        announcement came in meanwhile (another operator, the guard), so neither undoes the
        other unseen. (Two announcers at the very same instant can still race: last one wins.)"""
        ensure_model_topics(self.kafka, self.args.updates_topic, self.args.stats_topic,
                            self.args.connect_timeout)
        newest = self.state()
        if newest != based_on:
            now = f"{newest.version} serves ({newest.reason})" if newest else "nothing serves"
            raise RunFailed(f"the announcement of model {self.store.model_name!r} changed while "
                            f"deciding (now {now}): nothing announced, run it again")
        announce(self.kafka, announcement, self.args.updates_topic, READ_TIMEOUT_S)


def summary_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The figures an announcement carries (not the per-epoch history)."""
    return {key: metrics[key] for key in SUMMARY_KEYS if key in metrics}


def key_figure(metrics: Mapping[str, Any], split: str, name: str = "ndcg@10") -> float | None:
    value = metrics.get(split)
    if isinstance(value, Mapping) and isinstance(value.get(name), int | float):
        return float(value[name])
    return None


def named_versions(announcement: Announcement | None) -> set[str]:
    """Versions an announcement names: never pruned."""
    if announcement is None:
        return set()
    named = {announcement.version, *announcement.history}
    if announcement.shadow is not None:
        named.add(announcement.shadow.version)
    return named


@dataclass(frozen=True)
class Serving:
    """What the workers that reported lately serve: announced or not."""

    reports: list[WorkerReport]  # current ones (within --report-max-age-s)
    reporting: bool  # some worker ever reported what it serves

    def on(self, version: str) -> list[str]:
        return [r.instance for r in self.reports if r.status and r.status.serving == version]

    def refusals(self, version: str) -> list[tuple[str, str, str]]:
        """(instance, check, error) of the current workers that refused `version`."""
        return [(r.instance, f.check, f.error) for r in self.reports if r.status
                for f in r.status.refused if f.version == version]


def state_of(version: str, announcement: Announcement | None,
             serving: Serving | None = None) -> tuple[str, int | None]:
    """("serving" | "announced" | "shadow" | "history" | "stored", its place in the history,
    1 = newest). "serving": a worker that reported lately serves it (with no worker reports:
    the announced version); "announced": announced, but no such worker serves it."""
    known = serving is not None and bool(serving.reports)
    place = None
    if announcement is not None and version in announcement.history:
        place = announcement.history.index(version) + 1
    if known and serving is not None and serving.on(version):
        return "serving", place
    if announcement is not None:
        if version == announcement.version:
            return ("announced" if known else "serving"), None
        if announcement.shadow is not None and version == announcement.shadow.version:
            return "shadow", None
        if place is not None:
            return "history", place
    return "stored", None


def _state_text(state: str, place: int | None, version: str = "",
                announcement: Announcement | None = None, serving: Serving | None = None) -> str:
    parts = []
    if state == "serving" and serving is not None and serving.reports:
        parts.append(f"serving on {len(serving.on(version))}/{len(serving.reports)} workers")
    elif state != "history" and state != "stored":
        parts.append(state)
    if state == "serving" and announcement is not None and version == announcement.version \
            and serving is not None and serving.reports:
        parts.append("announced")
    if serving is not None and (refused := serving.refusals(version)):
        checks = ", ".join(sorted({check for _, check, _ in refused}))
        parts.append(f"refused by {len(refused)}/{len(serving.reports)} workers ({checks})")
    if place is not None:
        parts.append("rollback target" if place == 1 else f"history {place}")
    return ", ".join(parts)


def _when(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ms / 1000)) if ms else "?"


def describe_announcement(announcement: Announcement, serving: Serving | None = None) -> list[str]:
    header = f"{announcement.version}  ({announcement.reason}, {_when(announcement.announced_ms)})"
    reports = serving.reports if serving is not None else []
    if not reports:
        unknown = ("no worker reported lately" if serving is not None and serving.reporting
                   else "no worker reports what it serves")
        lines = [f"serving  {header}  (as announced: {unknown})"]
    elif len(serving.on(announcement.version)) == len(reports):  # type: ignore[union-attr]
        lines = [f"serving  {header}  on {len(reports)}/{len(reports)} workers"]
    else:
        lines = [f"announced {header}  served by {len(serving.on(announcement.version))}/"  # type: ignore[union-attr]
                 f"{len(reports)} workers"]
        for version in sorted({r.status.serving for r in reports if r.status}):
            lines.append(f"serving  {version}  on {len(serving.on(version))}/{len(reports)} "  # type: ignore[union-attr]
                         "workers" + ("" if version == announcement.version
                                      else " (not the announced version)"))
        for instance, check, error in serving.refusals(announcement.version):  # type: ignore[union-attr]
            lines.append(f"refused  {announcement.version} by {instance} ({check} check): {error}")
    if announcement.note:
        lines.append(f"         {announcement.note}")
    tail, serving_tail = announcement.metrics.get("tail"), announcement.metrics.get("serving_tail")
    if isinstance(tail, Mapping) and isinstance(tail.get("ndcg@10"), int | float):
        then = ""
        if isinstance(serving_tail, Mapping) and isinstance(serving_tail.get("ndcg@10"), int | float):
            then = f", the version serving then {serving_tail['ndcg@10']:.4f}"
        lines.append(f"retrain  NDCG@10 on the retrain's held-out tail (its snapshot's last "
                     f"events): {tail['ndcg@10']:.4f}{then}")
    if announcement.shadow is not None:
        lines.append(f"shadow   {announcement.shadow.version}  "
                     f"(scores {announcement.shadow.sample:.0%} of users, unpublished)")
    history = ", ".join(announcement.history) or "none"
    lines.append(f"history  {history}")
    return lines


def measured_on(metrics: Mapping[str, Any], split: str) -> str | None:
    """What a version's own figure of `split` was measured on, in words."""
    if key_figure(metrics, split) is None:
        return None
    users = metrics.get("users")
    who = f"{users:,} users" if isinstance(users, int) else "its users"
    position = "last" if split == "test" else "second-to-last"
    return f"own {split} split: the {position} event of {who} of its training data"


def _worker_line(report: WorkerReport) -> str:
    status = report.status
    assert status is not None  # a current report says what serves
    shadow = f", shadow {status.shadow}" if status.shadow else ""
    return f"worker   {report.instance}: serves {status.serving}{shadow} ({report.age_s():.0f} s ago)"


# ---------------------------------------------------------------- list and show


def run_list(context: Context) -> int:
    args = context.args
    unknown = None
    view = LiveView({}, [])
    try:
        announcement = context.state()
        view = context.live()
    except KafkaUnreachable as exc:
        announcement, unknown = None, str(exc)
    serving = Serving(context.current_reports(), view.reporting()) if unknown is None else None
    versions = context.store.versions()
    stored = {v.version for v in versions}
    rows = []
    for entry in reversed(versions):  # newest first
        state, place = state_of(entry.version, announcement, serving)
        rows.append({
            "version": entry.version, "created": entry.created,
            "manifest_sha256": entry.manifest_sha256, "state": state, "history_place": place,
            "announced": announcement is not None and entry.version == announcement.version,
            "workers_serving": serving.on(entry.version) if serving else [],
            "refused_by": [{"instance": i, "check": c, "error": e}
                           for i, c, e in (serving.refusals(entry.version) if serving else [])],
            "test_ndcg@10": key_figure(entry.metrics, "test"),
            "validation_ndcg@10": key_figure(entry.metrics, "validation"),
            "measured_on": {"test_ndcg@10": measured_on(entry.metrics, "test"),
                            "validation_ndcg@10": measured_on(entry.metrics, "validation")},
            "test_users": entry.metrics.get("users") if isinstance(entry.metrics.get("users"), int) else None,
            "text": _state_text(state, place, entry.version, announcement, serving),
        })
    missing = sorted(named_versions(announcement) - stored)
    if args.json:
        for row in rows:
            del row["text"], row["test_users"]
        print(json.dumps({
            "model": context.store.model_name, "store": str(context.store.folder),
            "serving_state_known": unknown is None, "why_unknown": unknown,
            "announcement": asdict(announcement) if announcement else None,
            "workers": [{"instance": r.instance, "age_s": round(r.age_s(), 1),
                         "counted": serving is not None and r in serving.reports,
                         **(asdict(r.status) if r.status else {"serving": None})}
                        for r in view.reports],
            "versions": rows, "announced_but_not_stored": missing,
        }, indent=1))
        return 0
    print(f"model {context.store.model_name}: {len(rows)} version(s) in {context.store.folder}")
    if unknown is not None:
        print(f"serving state unknown: {unknown}")
    elif announcement is None:
        print(f"nothing announced yet on {args.updates_topic} for this model")
    else:
        print("\n".join(describe_announcement(announcement, serving)))
    current = serving.reports if serving is not None else []
    for report in current:
        print(_worker_line(report))
    if len(view.reports) > len(current):
        print(f"workers  {len(view.reports) - len(current)} more report(s) not counted: older than "
              f"{args.report_max_age_s:g} s, or without what serves (`--json` lists them)")
    if rows:
        print()
        print(f"{'VERSION':<26} {'CREATED':<16} {'MANIFEST':<12} {'NDCG@10':>8} "
              f"{'MEASURED ON':<22}  STATE")
        for row in rows:
            test = row["test_ndcg@10"]
            users = row["test_users"]
            on = "-" if test is None else (f"own test, {users:,} users" if users else "own test")
            line = (f"{row['version']:<26} {row['created']:<16} {row['manifest_sha256'][:12]:<12} "
                    f"{'-' if test is None else f'{test:.4f}':>8} {on:<22}  {row['text']}")
            print(line.rstrip())
        print("NDCG@10: each version's own test split, the last event of each user of the data it "
              "was trained on\n(a dataset, or a retrain's snapshot): versions trained on different "
              "data do not compare")
    for version in missing:
        print(f"warning: {version} is named by the announcement but not in {context.store.folder}")
    return 0


def run_show(context: Context) -> int:
    args = context.args
    entry = context.store.get(args.version)
    from kvrec.model.artifact import load_artifact

    try:
        load_artifact(entry.path)
        integrity = "ok: every file's sha256 matches the manifest"
    except ArtifactError as exc:
        integrity = f"FAILED: {exc}"
    manifest = _json_file(entry.path / "manifest.json")
    model_config = _json_file(entry.path / "config.json").get("model", {})
    event_types = _json_file(entry.path / "vocab.json").get("event_types", [])
    unknown = None
    rates: dict[tuple[str, str], LiveRate] = {}
    try:
        announcement = context.state()
        rates = context.live_rates()
    except KafkaUnreachable as exc:
        announcement, unknown = None, str(exc)
    serving = None if unknown else Serving(context.current_reports(), context.live().reporting())
    state, place = state_of(entry.version, announcement, serving)
    live = {role: rates[(entry.version, role)] for role in (SERVE, SHADOW)
            if (entry.version, role) in rates}
    if args.json:
        print(json.dumps({
            "version": entry.version, "path": str(entry.path), "created": entry.created,
            "manifest_sha256": entry.manifest_sha256, "manifest": manifest,
            "integrity": integrity, "config": model_config, "event_types": event_types,
            "metrics": summary_metrics(entry.metrics),
            "measured_on": {split: measured_on(entry.metrics, split)
                            for split in ("test", "validation")},
            "state": state if unknown is None else "unknown", "history_place": place,
            "why_unknown": unknown,
            "live": {role: {"events": r.events, "hits": r.hits, "hit_rate": r.hit_rate}
                     for role, r in live.items()},
        }, indent=1))
        return 0
    print(f"version    {entry.version}")
    print(f"path       {entry.path}")
    print(f"created    {entry.created}")
    print(f"manifest   sha256 {entry.manifest_sha256}")
    for name, digest in sorted((manifest.get("sha256") or {}).items()):
        print(f"           {name:<22} {digest}")
    print(f"integrity  {integrity}")
    keys = ("d_model", "n_layers", "n_heads", "window", "n_items")
    print("model      " + ", ".join(f"{k} {model_config[k]}" for k in keys if k in model_config))
    print(f"events     {', '.join(event_types) or '-'}")
    for split in ("test", "validation", "popularity_test"):
        figures = entry.metrics.get(split)
        if isinstance(figures, Mapping):
            shown = "  ".join(f"{k} {v:.4f}" for k, v in figures.items() if isinstance(v, int | float))
            print(f"{split:<10} {shown}")
            on = measured_on(entry.metrics, "test" if split == "popularity_test" else split)
            if on:
                print(f"           (on its {on.removeprefix('own ')})")
    if unknown is not None:
        print(f"state      unknown: {unknown}")
    else:
        text = _state_text(state, place, entry.version, announcement, serving)
        print(f"state      {text or 'stored (not announced)'}")
        for role in (SERVE, SHADOW):
            if role in live:
                print(f"live       {figure(live[role], entry.version, role)}")
        if not live:
            print("live       no live figures")
    return 0


def _json_file(path: Any) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return document if isinstance(document, dict) else {}


# ---------------------------------------------------------------- changes


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


RUNNERS = {
    "list": run_list, "show": run_show, "publish": run_publish, "promote": run_promote,
    "shadow": run_shadow, "rollback": run_rollback, "guard": run_guard,
}


def main(args: argparse.Namespace) -> int:
    store = ModelStore(args.model_store, args.model_name)
    if args.action != "publish" and not store.root.is_dir():  # publish creates it
        raise ConfigError(f"--model-store {store.root}: no such directory (create it, or mount it)")
    context = Context(args, store, client_config(args))
    return RUNNERS[args.action](context)
