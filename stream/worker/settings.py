"""Worker settings: CLI flags, each also settable as `KVREC_WORKER_<FLAG>` (see `stream/cli.py`)."""

from __future__ import annotations

import argparse
import socket
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from kvrec.errors import ConfigError
from kvrec.flags import integer, number
from kvrec.model.choices import BACKENDS, RETRIEVAL_KINDS
from kvrec.stream.worker.scale_down import DEFAULT_API, DEFAULT_CREDENTIALS, split_pod_name

DEFAULT_EVENT_TYPES = ("view", "click", "add_to_cart", "purchase")
# --commit-interval-ms when not given, by guarantee. Under exactly-once a read_committed reader
# sees an output only when its transaction commits, so the interval is visible latency; the
# curve in docs/history/e2e.md ("Exactly-once: the commit interval") chose 100 ms (Kafka Streams'
# default under exactly-once too). At-least-once outputs are visible at once: there the
# interval only bounds what a crash replays.
COMMIT_INTERVAL_MS = {"at-least-once": 1000, "exactly-once": 100}
# --transaction-timeout-ms when not given (exactly-once): librdkafka's 60 s. A member killed
# inside a transaction leaves it open until this timeout, and read_committed readers see nothing
# past it (the new owner's outputs included) until the broker aborts it; Kafka Streams sets 10 s.
# But the broker also aborts a live member's transaction that a Kafka outage holds open past it,
# and the member, fenced, exits (a restart replays): with 10 s an exactly-once worker would not
# ride out an outage of 10 s mid-transaction (tests/test_worker_faults.py freezes the broker 15 s).
TRANSACTION_TIMEOUT_MS = 60_000


def add_topic_arguments(topics: argparse._ArgumentGroup) -> None:
    """The worker's topic names and consumer group (`kvrec worker`, `kvrec topics create`)."""
    topics.add_argument("--input-topic", default="events")
    topics.add_argument("--output-topic", default="recommendations")
    topics.add_argument("--dead-letter-topic", default="events-dead-letter")
    topics.add_argument(
        "--changelog-topic", default=None, help="default: <group-id>-windows-changelog"
    )
    topics.add_argument("--group-id", default="kvrec-worker", help="the workers' consumer group")


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    topics = parser.add_argument_group("topics")
    add_topic_arguments(topics)
    topics.add_argument(
        "--instance-id",
        default=socket.gethostname(),
        help="stable per replica (pod name), unique in the group: the static group membership "
             "id (group.instance.id) and, with exactly-once, the transactional id",
    )
    topics.add_argument(
        "--static-membership", action=argparse.BooleanOptionalAction, default=True,
        help="join the group as --instance-id, so a restarted replica takes its partitions "
             "straight back; a replica that stops for good frees them after the session timeout",
    )
    topics.add_argument(
        "--session-timeout-ms", type=integer(1_000, 3_600_000), default=45_000,
        help="how long the group waits for a silent member before moving its partitions "
             "(longer than a pod restart, so a restart causes no rebalance; the broker also "
             "bounds it: group.min/max.session.timeout.ms)",
    )
    topics.add_argument(
        "--leave-group-on-stop", action=argparse.BooleanOptionalAction, default=False,
        help="a static member leaves the group when it stops (its partitions move at once) "
             "instead of keeping them for a restart until the session timeout; without it, "
             "SIGUSR2 stops the worker and leaves for that stop only (a scale-down)",
    )
    topics.add_argument(
        "--leave-on-scale-down", action=argparse.BooleanOptionalAction, default=False,
        help="on SIGTERM, ask the Kubernetes API for the StatefulSet's spec.replicas and leave "
             "the group when this pod's ordinal (--pod-name) is >= it (a scale-down); a restart, "
             "or an API that cannot be asked (one warning), keeps the static identity",
    )
    topics.add_argument(
        "--pod-name", default=socket.gethostname(),
        help="this pod's name, <statefulset>-<ordinal>, for --leave-on-scale-down",
    )
    topics.add_argument(
        "--kubernetes-api", default=DEFAULT_API,
        help="the Kubernetes API's base URL, for --leave-on-scale-down",
    )
    topics.add_argument(
        "--kubernetes-credentials", default=str(DEFAULT_CREDENTIALS),
        help="folder of the pod's service-account token, ca.crt and namespace files, for "
             "--leave-on-scale-down",
    )
    topics.add_argument(
        "--standby-replicas", type=integer(0, 16), default=0,
        help="warm copies of other members' partitions this member keeps by tailing their "
             "changelog (state_dir/<group>/standby): a partition it takes over restores only "
             "the tail past its copy. Placement: the members sorted by id form a ring, and each "
             "shadows the partitions of the next N members (stream/worker/placement.py)",
    )
    topics.add_argument(
        "--create-topics",
        action="store_true",
        help="create missing topics (input with --partitions, changelog alike, output compacted)",
    )
    topics.add_argument("--partitions", type=integer(1), default=4, help="for --create-topics")

    model = parser.add_argument_group("model")
    model.add_argument(
        "--model", default=None,
        help="model artifact directory, served when no version is announced (with neither, "
             "the worker starts in cold-start mode: live popular items)",
    )
    model.add_argument(
        "--model-store", default=None,
        help="the model store (a directory or mounted volume, `kvrec models`): serve the version "
             "the model-updates topic announces and hot-swap to each new one",
    )
    model.add_argument("--model-name", default="default", help="the model's name in the store")
    model.add_argument("--updates-topic", default="model-updates",
                       help="compacted topic of model announcements")
    model.add_argument("--stats-topic", default="model-live-stats",
                       help="compacted topic where the worker publishes its live hit rates")
    model.add_argument(
        "--prewarm-users", type=integer(0), default=10_000,
        help="before a swap, refill the new model's caches of this many most recent users",
    )
    model.add_argument(
        "--live-users", type=integer(1), default=100_000,
        help="users whose last list is remembered for the live hit rate",
    )
    model.add_argument(
        "--stats-interval-ms", type=integer(100), default=10_000,
        help="how often the live hit rates are published to --stats-topic",
    )
    model.add_argument("--backend", default="torch-cpu", choices=BACKENDS)
    model.add_argument("--onnx", default=None, help="ONNX file of step (onnx-cpu; default: export)")
    model.add_argument("--k", type=integer(1), default=10, help="recommendations per event")
    model.add_argument(
        "--retrieval", default="auto", choices=RETRIEVAL_KINDS,
        help="auto: exact below --approx-threshold items, IVF-PQ fast-scan above; with "
             "--backend torch-cuda, torch-exact (exact top-k on the GPU, exclusions applied "
             "there, only the k best come back)",
    )
    model.add_argument(
        "--approx-threshold", type=integer(0), default=10_000,
        help="catalog size from which auto retrieval is approximate (recall@10 tuned at start)",
    )
    model.add_argument(
        "--exclude-seen", action=argparse.BooleanOptionalAction, default=True,
        help="leave the items in the user's window out of its recommendations",
    )
    model.add_argument("--unavailable-items", default=None, help="file: one item id per line")
    model.add_argument("--because", type=integer(0), default=3, help="events named in `because`")
    model.add_argument(
        "--threads", type=integer(0), default=1,
        help="torch threads; 1 avoids spin-wait contention on small machines (0 = torch default)",
    )

    loop = parser.add_argument_group("loop and state")
    loop.add_argument(
        "--processes", type=integer(0), default=1,
        help="worker processes on this machine, one consumer group (0 = one per available core: "
             "CPU affinity capped by the cgroup CPU limit); each child is --instance-id-<i> with "
             "its probes and /metrics on --metrics-port + 1 + i, and the parent answers /health "
             "and /ready on --metrics-port for all of them; a child that exits stops the rest "
             "and the parent exits with status 1",
    )
    loop.add_argument("--batch-size", type=integer(1), default=512, help="events per micro-batch (B)")
    loop.add_argument("--batch-wait-ms", type=integer(0), default=10, help="wait for a batch (T)")
    loop.add_argument(
        "--adaptive-batch", action=argparse.BooleanOptionalAction, default=False,
        help="size each micro-batch from the backlog: after a full batch wait up to T for B "
             "events as usual; otherwise take the first event (waiting up to T) and what follows "
             "within 1 ms, so a low rate is not held back to fill a batch (off by default: on "
             "the loaded 2-core machine its small batches cost more than the wait saved)",
    )
    loop.add_argument("--linger-ms", type=integer(0), default=2, help="producer linger")
    loop.add_argument(
        "--commit-interval-ms", type=integer(1), default=None,
        help="checkpoint every this many ms (default: 1000 at-least-once, 100 exactly-once, "
             "where a read_committed reader sees an output only once its transaction commits)",
    )
    loop.add_argument(
        "--transaction-timeout-ms", type=integer(1_000, 900_000), default=None,
        help="exactly-once: how long the broker keeps a killed member's open transaction "
             "before aborting it (read_committed readers wait for it; default: "
             f"{TRANSACTION_TIMEOUT_MS} under exactly-once, librdkafka's; Kafka Streams uses "
             "10000, but a Kafka outage longer than it mid-transaction fences the worker, which "
             "exits and replays on restart; above --commit-interval-ms, at most the broker's "
             "transaction.max.timeout.ms)",
    )
    loop.add_argument(
        "--outage-limit-s", type=number(above=0, below=300), default=120.0,
        help="how long a checkpoint waits for an unreachable Kafka before the worker exits "
             "with an error (nothing of the checkpoint is committed; a restart replays it); "
             "below the consumer's 300 s max.poll.interval.ms, which a longer wait would break",
    )
    loop.add_argument(
        "--processing-guarantee",
        default="at-least-once",
        choices=("at-least-once", "exactly-once"),
    )
    loop.add_argument("--state-dir", default="./state-data")
    loop.add_argument(
        "--release-memory-s", type=number(low=0), default=10.0,
        help="every this many seconds, hand the heap's free pages back to the OS (glibc "
             "malloc_trim; 0 = never): batches of different sizes leave freed memory inside "
             "the heap, which the process's resident size would keep",
    )
    loop.add_argument(
        "--cache-bytes", type=integer(1), default=1 << 30,
        help="key/value cache pool budget in bytes: the slabs of all its slots (allocated when a "
             "model loads, on the backend's device) plus the cached users' known events",
    )
    loop.add_argument(
        "--windows-in-memory", type=integer(0), default=10_000,
        help="checkpointed windows kept in memory per partition (least recently used out)",
    )
    loop.add_argument(
        "--no-kv-cache", action="store_true",
        help="re-encode the user's window for every event (the baseline `kvrec bench e2e` "
             "compares against; same answers, no cache reuse)",
    )
    loop.add_argument(
        "--window-capacity", type=integer(0), default=0,
        help="events kept per user (0 = the model's N*(W-1)+1, the least for exact refills)",
    )
    loop.add_argument("--event-types", default=",".join(DEFAULT_EVENT_TYPES))
    loop.add_argument("--max-event-bytes", type=integer(1), default=16_384)
    loop.add_argument(
        "--dead-letter-max-bytes", type=integer(1, 900_000), default=262_144,
        help="a dead letter's value is cut to this size (header kvrec.original_bytes keeps the "
             "size); keep it below the dead-letter topic's max.message.bytes (at most 900000: "
             "a dead letter, with its key and headers, must fit the producer's 1,000,000 bytes)",
    )
    loop.add_argument("--max-future-ms", type=integer(0), default=300_000)
    loop.add_argument(
        "--metrics-port", type=integer(-1, 65_535), default=9464, help="0 = any free port, -1 = off"
    )
    loop.add_argument(
        "--metrics-host", default="0.0.0.0",
        help="address the metrics server listens on: 0.0.0.0 every interface (Kubernetes "
             "probes and Prometheus reach the pod IP), 127.0.0.1 this machine only, :: IPv6",
    )


@dataclass(frozen=True)
class WorkerSettings:
    input_topic: str
    output_topic: str
    dead_letter_topic: str
    changelog_topic: str
    group_id: str
    instance_id: str
    static_membership: bool
    session_timeout_ms: int
    model: Path | None
    backend: str
    onnx: Path | None
    k: int
    retrieval: str
    approx_threshold: int
    exclude_seen: bool
    unavailable_items: Path | None
    because: int
    batch_size: int
    batch_wait_ms: int
    adaptive_batch: bool
    linger_ms: int
    commit_interval_ms: int
    outage_limit_s: float
    exactly_once: bool
    state_dir: Path
    cache_bytes: int
    reuse_kv_cache: bool
    windows_in_memory: int
    window_capacity: int  # 0 until the model is known
    event_types: tuple[str, ...]
    max_event_bytes: int
    dead_letter_max_bytes: int
    max_future_ms: int
    metrics_port: int
    metrics_host: str = "0.0.0.0"
    model_store: Path | None = None
    model_name: str = "default"
    updates_topic: str = "model-updates"
    stats_topic: str = "model-live-stats"
    prewarm_users: int = 10_000
    live_users: int = 100_000
    stats_interval_ms: int = 10_000
    standby_replicas: int = 0
    leave_group_on_stop: bool = False
    leave_on_scale_down: bool = False
    pod_name: str = ""
    kubernetes_api: str = DEFAULT_API
    kubernetes_credentials: Path = DEFAULT_CREDENTIALS
    transaction_timeout_ms: int = TRANSACTION_TIMEOUT_MS

    @cached_property  # read once per message on the hot path: built once
    def event_type_set(self) -> frozenset[str]:
        return frozenset(self.event_types)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> WorkerSettings:
        # each number's range is checked by its flag's type (add_worker_arguments)
        if args.static_membership and not args.instance_id.strip():
            raise ConfigError("--instance-id must not be empty with --static-membership")
        event_types = tuple(t.strip() for t in args.event_types.split(",") if t.strip())
        if not event_types or len(set(event_types)) != len(event_types):
            raise ConfigError("--event-types must be a comma-separated list of distinct names")
        model = Path(args.model) if args.model else None
        if model is not None and not model.is_dir():
            raise ConfigError(f"--model {model}: no such model artifact directory")
        store = Path(args.model_store) if args.model_store else None
        if store is not None and not store.is_dir():
            raise ConfigError(f"--model-store {store}: no such directory (create it, or mount it)")
        if not args.model_name or "/" in args.model_name or args.model_name.startswith("."):
            raise ConfigError(f"--model-name {args.model_name!r}: use letters, digits, '-' or '_'")
        unavailable = Path(args.unavailable_items) if args.unavailable_items else None
        if unavailable is not None and not unavailable.is_file():
            raise ConfigError(f"--unavailable-items {unavailable}: no such file")
        if args.leave_on_scale_down and split_pod_name(args.pod_name) is None:
            raise ConfigError(f"--pod-name {args.pod_name!r}: --leave-on-scale-down needs a "
                              "StatefulSet pod's name, <statefulset>-<ordinal>")
        return cls(
            input_topic=args.input_topic,
            output_topic=args.output_topic,
            dead_letter_topic=args.dead_letter_topic,
            changelog_topic=args.changelog_topic or f"{args.group_id}-windows-changelog",
            group_id=args.group_id,
            instance_id=args.instance_id,
            static_membership=args.static_membership,
            session_timeout_ms=args.session_timeout_ms,
            model=model,
            backend=args.backend,
            onnx=Path(args.onnx) if args.onnx else None,
            k=args.k,
            retrieval=args.retrieval,
            approx_threshold=args.approx_threshold,
            exclude_seen=args.exclude_seen,
            unavailable_items=unavailable,
            because=args.because,
            batch_size=args.batch_size,
            batch_wait_ms=args.batch_wait_ms,
            adaptive_batch=args.adaptive_batch,
            linger_ms=args.linger_ms,
            commit_interval_ms=(COMMIT_INTERVAL_MS[args.processing_guarantee]
                                if args.commit_interval_ms is None else args.commit_interval_ms),
            outage_limit_s=args.outage_limit_s,
            exactly_once=args.processing_guarantee == "exactly-once",
            state_dir=Path(args.state_dir),
            cache_bytes=args.cache_bytes,
            reuse_kv_cache=not args.no_kv_cache,
            windows_in_memory=args.windows_in_memory,
            window_capacity=args.window_capacity,
            event_types=event_types,
            max_event_bytes=args.max_event_bytes,
            dead_letter_max_bytes=args.dead_letter_max_bytes,
            max_future_ms=args.max_future_ms,
            metrics_port=args.metrics_port,
            metrics_host=args.metrics_host,
            model_store=store,
            model_name=args.model_name,
            updates_topic=args.updates_topic,
            stats_topic=args.stats_topic,
            prewarm_users=args.prewarm_users,
            live_users=args.live_users,
            stats_interval_ms=args.stats_interval_ms,
            standby_replicas=args.standby_replicas,
            leave_group_on_stop=args.leave_group_on_stop,
            leave_on_scale_down=args.leave_on_scale_down,
            pod_name=args.pod_name,
            kubernetes_api=args.kubernetes_api,
            kubernetes_credentials=Path(args.kubernetes_credentials),
            transaction_timeout_ms=transaction_timeout_ms(args),
        )


def transaction_timeout_ms(args: argparse.Namespace) -> int:
    """--transaction-timeout-ms or its default; a transaction spans a commit interval, so the
    timeout must be longer (otherwise the broker would abort every transaction)."""
    timeout = TRANSACTION_TIMEOUT_MS if args.transaction_timeout_ms is None \
        else args.transaction_timeout_ms
    interval = (COMMIT_INTERVAL_MS[args.processing_guarantee]
                if args.commit_interval_ms is None else args.commit_interval_ms)
    if args.processing_guarantee == "exactly-once" and timeout <= interval:
        raise ConfigError(f"--transaction-timeout-ms {timeout} must be above "
                          f"--commit-interval-ms {interval} (a transaction spans an interval)")
    return timeout
