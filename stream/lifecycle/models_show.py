"""`kvrec models list` and `kvrec models show`: what is stored, announced and served.

A version's state combines the announcement (serving, shadow, history) with what the workers
that reported lately serve: "serving" when a worker serves it (with no worker reports, the
announced version), "announced" when announced but no such worker serves it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from kvrec.errors import ArtifactError
from kvrec.model.store import StoredVersion
from kvrec.stream.kafka_config import KafkaUnreachable
from kvrec.stream.lifecycle.announcements import (
    Announcement,
)
from kvrec.stream.lifecycle.live_stats import LiveRate, LiveView, WorkerReport
from kvrec.stream.lifecycle.models_context import Context, key_figure, named_versions, summary_metrics
from kvrec.stream.lifecycle.policy import figure
from kvrec.stream.lifecycle.roles import ModelRole


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
    rows = _list_rows(versions, announcement, serving)
    missing = sorted(named_versions(announcement) - {v.version for v in versions})
    if args.json:
        _print_list_json(context, rows, missing, announcement, view, serving, unknown)
    else:
        _print_list_text(context, rows, missing, announcement, view, serving, unknown)
    return 0


def _list_rows(versions: list[StoredVersion], announcement: Announcement | None,
               serving: Serving | None) -> list[dict[str, Any]]:
    """One row per stored version, newest first."""
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
    return rows


def _print_list_json(context: Context, rows: list[dict[str, Any]], missing: list[str],
                     announcement: Announcement | None, view: LiveView, serving: Serving | None,
                     unknown: str | None) -> None:
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


def _print_list_text(context: Context, rows: list[dict[str, Any]], missing: list[str],
                     announcement: Announcement | None, view: LiveView, serving: Serving | None,
                     unknown: str | None) -> None:
    args = context.args
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
    live = {role: rates[(entry.version, role)] for role in (ModelRole.SERVE, ModelRole.SHADOW)
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
    _print_stored(entry, manifest, model_config, event_types, integrity)
    if unknown is not None:
        print(f"state      unknown: {unknown}")
    else:
        text = _state_text(state, place, entry.version, announcement, serving)
        print(f"state      {text or 'stored (not announced)'}")
        for role in (ModelRole.SERVE, ModelRole.SHADOW):
            if role in live:
                print(f"live       {figure(live[role], entry.version, role)}")
        if not live:
            print("live       no live figures")
    return 0


def _print_stored(entry: StoredVersion, manifest: dict[str, Any], model_config: dict[str, Any],
                  event_types: list[str], integrity: str) -> None:
    """What the store holds of a version: files, integrity, config, its own figures."""
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


def _json_file(path: Any) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return document if isinstance(document, dict) else {}


