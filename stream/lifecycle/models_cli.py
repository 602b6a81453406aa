"""`kvrec models`: inspect the model store and choose what serves.

    kvrec models list [--json]                        # stored versions, what serves, its shadow
    kvrec models show VERSION [--json]                # manifest, metrics, config, state, live figures
    kvrec models publish DIR [--serve | --shadow [--sample F]] [--keep N]
    kvrec models promote VERSION [--require-live [--live-margin M] [--min-live-events N]]
    kvrec models shadow VERSION [--sample F] | kvrec models shadow --stop
    kvrec models rollback [--to VERSION]
    kvrec models guard [--once] [--margin M] [--confidence C] [--min-live-events N] [--interval-s S]

The store (model/store.py) holds the versions; the newest record of the compacted
`model-updates` topic (stream/lifecycle/announcements.py) says which one should serve,
which one shadows and what served before; the workers' reports on the stats topic say what
does serve (a worker refuses a version that fails a check and keeps the one it serves). `list`
shows both; the
rollback history holds only versions a worker reported serving; `promote --require-live` and
`guard` judge the version the workers serve. Every change is a new record on the updates
topic; a refusal announces nothing. A version is checked before it is announced: it is in the
store and every file's sha256 matches its manifest. Every action but `publish` refuses a
--model-store folder that does not exist, as the worker does.

Here: the flags and the dispatch. The actions: models_show.py (list, show) and
models_change.py (publish, promote, shadow, rollback, guard); models_context.py holds what
they share (the store, the announcement, the workers' reports).
"""

from __future__ import annotations

import argparse

from kvrec.errors import ConfigError
from kvrec.flags import integer, number
from kvrec.model.store import ModelStore
from kvrec.stream.flag_groups import COMMAND_GROUP
from kvrec.stream.kafka_config import add_kafka_arguments, client_config
from kvrec.stream.lifecycle.announcements import LIVE_STATS_TOPIC, UPDATES_TOPIC
from kvrec.stream.lifecycle.models_change import run_guard, run_promote, run_publish, run_rollback, run_shadow
from kvrec.stream.lifecycle.models_context import Context
from kvrec.stream.lifecycle.models_show import run_list, run_show
from kvrec.stream.logs import add_logging_arguments

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
