"""The checkpoint: the order in which a batch of work becomes durable (Kafka operations only;
the windows' side is `state.partition.PartitionWindows`' prepare / flush / abort).

1. produce the changed windows to the changelog topic (outputs were produced as they were made);
2. flush the producer and confirm every delivery;
3. commit the input offsets (inside the Kafka transaction with exactly-once, which also
   commits the outputs and changelog records atomically);
4. write the windows to RocksDB with the changelog offset in the same WriteBatch.

An error anywhere in the worker (`abort`) commits nothing: with exactly-once the transaction
is aborted (outputs, dead letters and changelog records with it), and the changed windows are
dropped unwritten, so a restart replays the input from the last commit.

A crash before 3 replays the input from the last commit (outputs may repeat under
at-least-once; the changelog records of the lost attempt carry input offsets that were never
committed and are skipped by recovery). A crash between 3 and 4 leaves RocksDB behind its
changelog, and recovery replays the committed changelog records.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from kvrec.errors import RunFailed
from kvrec.state.partition import WorkerState
from kvrec.stream.kafka_config import kafka_error_text
from kvrec.stream.worker.produce import produce

log = logging.getLogger(__name__)


WAIT_MARGIN_S = 10.0  # longest_wait_s: the checkpoint's own work besides its waits for Kafka


class DeliveryError(RunFailed):
    """A record could not be delivered, or Kafka stayed unreachable for longer than the outage
    limit; the checkpoint is abandoned and the worker stops with one line and status 1 (a
    `RunFailed`: nothing of it is committed, and a restart replays the work)."""


# how every ClientHang and ClientFailed ends: what the worker does about it (the tests'
# supervisors look for it)
RESTART = "the worker exits without committing, and a restart replays the work"

# A transactional call that timed out this many times in a row, and once more after the cluster
# had answered a metadata request, while the cluster answers again, is stuck in the client, not
# waiting for the broker (seen after a broker froze past the session timeout: the static
# consumer was fenced, the transaction failed, and abort_transaction then timed out every 10 s
# for minutes with its request in the out-queue). One answer is not enough: a metadata request
# sent while the broker is frozen is answered when it thaws, and the next call then succeeds.
STUCK_AFTER_TIMEOUTS = 3


class ClientHang(DeliveryError):
    """A transactional call did not return long after its own timeout (librdkafka can wait
    forever for a group coordinator that went away: confluentinc/librdkafka#5456, #5511), kept
    timing out while the cluster answered, or the transaction could not be aborted at all.
    Nothing of the checkpoint is committed; the worker must exit without touching its clients
    again (they may hang too), and a restart replays the work (the new producer's
    init_transactions fences this one and aborts its transaction)."""


class ClientFailed(RunFailed):
    """A Kafka client failed for good (a fatal error: e.g. a static consumer fenced by its own
    rejoin after a broker froze past the session timeout), so it can consume or produce nothing
    more. The worker aborts what it has not committed and exits with status 1, saying so in one
    line; a restart (Kubernetes restarts the pod) replays the work with new clients."""


# Error codes after which a client can do nothing more: it must be replaced (the process
# restarted). librdkafka flags most of them fatal, but not all where they surface (a fenced
# static consumer's commit fails with FENCED_INSTANCE_ID unflagged; consume() hands out _FATAL
# unflagged).
FAILED_FOR_GOOD = frozenset({
    KafkaError._FATAL, KafkaError._FENCED, KafkaError.PRODUCER_FENCED,
    KafkaError.FENCED_INSTANCE_ID, KafkaError.TRANSACTION_COORDINATOR_FENCED,
})


def failed_for_good(exc: BaseException | KafkaError) -> bool:
    """Whether `exc` says a Kafka client failed for good (fatal, or fenced by a newer instance)."""
    if isinstance(exc, KafkaException):
        return bool(exc.args) and failed_for_good(exc.args[0])
    if isinstance(exc, KafkaError):
        return exc.fatal() or exc.code() in FAILED_FOR_GOOD
    # A fenced producer's delivery report reaches Python with an exception already pending in
    # confluent-kafka's C code: the callback cannot even look at its error, and flush() / poll()
    # return NULL without an exception (seen with confluent-kafka 2.x, tests/test_worker_faults.py)
    return isinstance(exc, SystemError) and "cimpl." in str(exc)


class TransactionAborted(RuntimeError):
    """The broker aborted the transaction (for example after it restarted): nothing of the
    work since the last checkpoint is committed, and the worker must replay it."""


# A plain offset commit sent while the group rebalances (a member joins or leaves) fails with
# one of these: the generation moved on under it. The client rejoins by itself and, with
# cooperative rebalancing, this member still owns its partitions until its revoke callback has
# run (which checkpoints), so the same commit goes through a moment later. Seen as a crash of
# one of two `kvrec worker --processes 2` children when the second joined.
REBALANCING = frozenset({KafkaError.ILLEGAL_GENERATION, KafkaError.REBALANCE_IN_PROGRESS})
# ... or while the group's coordinator is being found again (after a broker outage or restart:
# seen as `Commit failed: Local: Waiting for coordinator` right after a frozen broker thawed,
# which librdkafka does not flag retriable); the client finds it by itself, within the limit
COORDINATOR_MOVING = frozenset({
    KafkaError._WAIT_COORD, KafkaError.COORDINATOR_NOT_AVAILABLE, KafkaError.NOT_COORDINATOR,
    KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
})


class Checkpoint:
    def __init__(
        self,
        consumer: Consumer,
        producer: Producer,
        state: WorkerState,
        *,
        input_topic: str,
        changelog_topic: str,
        exactly_once: bool,
        interval_s: float,
        outage_limit_s: float = 120.0,
        call_timeout_s: float = 10.0,
    ) -> None:
        self.consumer = consumer
        self.producer = producer
        self.state = state
        self.input_topic = input_topic
        self.changelog_topic = changelog_topic
        self.exactly_once = exactly_once
        self.interval_s = interval_s
        self.outage_limit_s = outage_limit_s  # how long Kafka may be unreachable mid-checkpoint
        self.call_timeout_s = call_timeout_s  # one blocking client call, retried until the limit
        self.started = time.monotonic()
        self.pending_offsets: dict[int, int] = {}  # partition -> last processed input offset
        self._changelog_offsets: dict[int, int] = {}
        self._errors: list[str] = []
        if exactly_once:
            self.producer.begin_transaction()

    @property
    def longest_wait_s(self) -> float:
        """The longest a `commit` or an `abort` waits for Kafka before it gives up (and the
        worker exits): the outage limit, a last blocking call begun just before it (`_bounded`
        lets one run 3 times its timeout), and a margin."""
        return self.outage_limit_s + 3 * self.call_timeout_s + WAIT_MARGIN_S

    def store_offset(self, partition: int, offset: int) -> None:
        """`offset` of `partition` is handled (applied, duplicate or dead-lettered). Offsets
        only move forward: storing an older one changes nothing."""
        if offset > self.pending_offsets.get(partition, -1):
            self.pending_offsets[partition] = offset

    def forget(self, partition: int) -> None:
        """The partition is gone (revoked or lost): nothing of it is committed from here."""
        self.pending_offsets.pop(partition, None)
        self._changelog_offsets.pop(partition, None)

    def due(self) -> bool:
        return bool(self.pending_offsets) and time.monotonic() - self.started >= self.interval_s

    def on_delivery(self, error: object, message: Message) -> None:
        """Delivery callback for every record the worker produces."""
        if error is not None:
            try:
                self._errors.append(f"{message.topic()}[{message.partition()}]: {error}")
            except BaseException:  # confluent-kafka left an exception pending: see failed_for_good
                self._errors.append("a delivery failed, and the Kafka client could not say why")
        elif message.topic() == self.changelog_topic:
            partition = message.partition()
            offset = message.offset()
            if offset > self._changelog_offsets.get(partition, -1):
                self._changelog_offsets[partition] = offset

    def commit(self) -> bool:
        """Make everything processed so far durable, in the order described above; False when
        there was nothing to commit."""
        offsets = dict(self.pending_offsets)
        if not offsets:
            self.started = time.monotonic()
            return False
        # 1. changelog records for every changed window
        for partition, windows in self.state.items():
            for record in windows.prepare():
                produce(self.producer, self.changelog_topic, record.key, record.window,
                        self.on_delivery, record.headers, partition=partition)
        # 2. flush and confirm (the client retries on its own while the broker is away); with
        #    exactly-once, committing the transaction flushes what is left, and a failed
        #    delivery means the broker aborts it
        deadline = time.monotonic() + self.outage_limit_s
        remaining = self.producer.flush(self.call_timeout_s)
        while remaining and not self.exactly_once and not self._errors and time.monotonic() < deadline:
            remaining = self.producer.flush(self.call_timeout_s)
        if self._errors:
            errors = "; ".join(self._errors[:5])
            self._errors.clear()
            if self.exactly_once:
                raise TransactionAborted(f"deliveries failed in the transaction: {errors}")
            raise DeliveryError(f"checkpoint abandoned, deliveries failed: {errors}")
        if remaining and not self.exactly_once:
            raise DeliveryError(
                f"checkpoint abandoned: {remaining} records still undelivered after "
                f"{self.outage_limit_s:.0f} s (--outage-limit-s)"
            )
        # 3. commit input offsets (in the transaction with exactly-once)
        commit = [TopicPartition(self.input_topic, p, o + 1) for p, o in offsets.items()]
        if self.exactly_once:
            metadata = self.consumer.consumer_group_metadata()
            self._retrying("send the offsets to the transaction", deadline, lambda: self._bounded(
                "sending the offsets to the transaction",
                lambda: self.producer.send_offsets_to_transaction(
                    commit, metadata, self.call_timeout_s
                ),
            ), transactional=True)
            self._retrying("commit the transaction", deadline, lambda: self._bounded(
                "committing the transaction",
                lambda: self.producer.commit_transaction(self.call_timeout_s),
            ), transactional=True)
            self.producer.flush(0)  # the delivery reports of what the commit flushed
            self._retrying("begin a transaction", deadline, self.producer.begin_transaction)
        else:
            self._retrying("commit offsets", deadline,
                           lambda: self.consumer.commit(offsets=commit, asynchronous=False),
                           also_retriable=REBALANCING | COORDINATOR_MOVING)
        # 4. windows + changelog offset into RocksDB, atomically per partition
        for partition, windows in self.state.items():
            windows.flush(self._changelog_offsets.get(partition))
        self.pending_offsets.clear()
        self.started = time.monotonic()
        return True

    def _bounded(self, what: str, call: Callable[[], object]) -> None:
        """`call`, which has a timeout of its own, in a helper thread: if it has not returned
        well after that timeout, it is hung, and `ClientHang` says so."""
        done = threading.Event()
        raised: list[BaseException] = []

        def run() -> None:
            try:
                call()
            except BaseException as exc:  # handed to the caller below
                raised.append(exc)
            finally:
                done.set()

        threading.Thread(target=run, name="kvrec-txn-call", daemon=True).start()
        limit = 3 * self.call_timeout_s
        if not done.wait(limit):
            raise ClientHang(
                f"{what} did not return in {limit:.0f} s although its timeout is "
                f"{self.call_timeout_s:.0f} s (the Kafka client waits for a group coordinator "
                f"that went away; confluentinc/librdkafka#5456): {RESTART}"
            )
        if raised:
            raise raised[0]

    def _retrying(self, what: str, deadline: float, call: Callable[[], object],
                  also_retriable: frozenset[int] = frozenset(),
                  transactional: bool = False) -> None:
        """`call`, again while its error is retriable (the broker is away, or a code in
        `also_retriable`) and the outage limit is not reached; an aborted transaction raises
        `TransactionAborted`. A `transactional` call that keeps timing out while the cluster
        answers is stuck in the client: `ClientHang` (see `STUCK_AFTER_TIMEOUTS`)."""
        timeouts = 0
        answered_before_this_call = False
        while True:
            try:
                call()
                return
            except KafkaException as exc:
                error = exc.args[0] if exc.args else None
                if getattr(error, "txn_requires_abort", lambda: False)():
                    raise TransactionAborted(f"could not {what}: {kafka_error_text(exc)}") from None
                code = getattr(error, "code", lambda: None)()
                if failed_for_good(exc):
                    raise ClientFailed(  # e.g. fenced: another process has this transactional id
                        f"could not {what}: the Kafka client failed for good "
                        f"({kafka_error_text(exc)}): {RESTART}"
                    ) from None
                retriable = (getattr(error, "retriable", lambda: False)()
                             or code in also_retriable)
                timeouts = timeouts + 1 if code == KafkaError._TIMED_OUT else 0
                if transactional and timeouts >= STUCK_AFTER_TIMEOUTS:
                    answers = self._cluster_answers()
                    if answers and answered_before_this_call:
                        raise ClientHang(
                            f"could not {what}: it timed out {timeouts} times in a row "
                            f"({self.call_timeout_s:.0f} s each), the last one sent after the "
                            "cluster had answered and while the cluster answered, so the Kafka "
                            f"client's transaction is stuck ({kafka_error_text(exc)}): {RESTART}"
                        ) from None
                    answered_before_this_call = answers
                else:
                    answered_before_this_call = False
                if not retriable or time.monotonic() > deadline:
                    raise DeliveryError(
                        f"could not {what}: {kafka_error_text(exc)}"
                        + (f" (Kafka unreachable for {self.outage_limit_s:.0f} s, --outage-limit-s)"
                           if retriable else "")
                    ) from None
                log.warning("could not %s yet (%s); retrying", what, kafka_error_text(exc))
                time.sleep(0.5)

    def _cluster_answers(self) -> bool:
        """Whether the cluster answers a metadata request (the changelog topic's) now."""
        try:
            self._bounded("asking the cluster for metadata", lambda: self.producer.list_topics(
                self.changelog_topic, timeout=self.call_timeout_s))
        except KafkaException:
            return False
        return True

    def abort(self) -> None:
        """Give up everything since the last commit: nothing of it becomes durable. With
        exactly-once, a new transaction is begun (for a worker that goes on); a transaction that
        cannot be aborted (stuck, fenced, or Kafka away past the outage limit) leaves a producer
        that can do nothing more, and `ClientHang` says the worker must exit and restart."""
        self.pending_offsets.clear()
        self._errors.clear()
        for _, windows in self.state.items():
            windows.abort()
        if self.exactly_once:
            deadline = time.monotonic() + self.outage_limit_s
            try:
                self._retrying("abort the transaction", deadline, lambda: self._bounded(
                    "aborting the transaction",
                    lambda: self.producer.abort_transaction(self.call_timeout_s),
                ), transactional=True)
                self._retrying("begin a transaction", deadline, self.producer.begin_transaction)
            except ClientHang:
                raise
            except (DeliveryError, TransactionAborted) as failed:
                raise ClientHang(f"{failed}: {RESTART}") from None
