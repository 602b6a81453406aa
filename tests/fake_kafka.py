"""In-memory stand-ins for the worker's three Kafka clients, for property-based tests that run
thousands of cases (each feature also has a test against the real broker).

They keep the real clients' contracts that matter here: a record larger than the producer's
`message.max.bytes` is refused synchronously with MSG_SIZE_TOO_LARGE, headers must be bytes,
deliveries are confirmed on `poll`/`flush`, and a partition read ends with a PARTITION_EOF.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from confluent_kafka import KafkaError, KafkaException, TopicPartition

MESSAGE_MAX_BYTES = 1_000_000  # librdkafka's default


@dataclass
class FakeMessage:
    _topic: str
    _partition: int
    _offset: int
    _key: bytes | None
    _value: bytes | None
    _headers: list[tuple[str, bytes]] | None = None
    _timestamp: int = 1
    _error: object | None = None

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes | None:
        return self._key

    def value(self) -> bytes | None:
        return self._value

    def headers(self) -> list[tuple[str, bytes]] | None:
        return self._headers

    def timestamp(self) -> tuple[int, int]:
        return (1, self._timestamp)

    def error(self) -> object | None:
        return self._error


class _Eof:
    def code(self) -> int:
        return KafkaError._PARTITION_EOF


@dataclass
class FakeProducer:
    log: dict[tuple[str, int], list[FakeMessage]] = field(default_factory=dict)
    _pending: list[tuple[object, FakeMessage]] = field(default_factory=list)

    def produce(self, topic: str, key: bytes | None = None, value: bytes | None = None,
                partition: int = 0, headers: dict[str, bytes] | None = None,
                on_delivery: object = None) -> None:
        size = len(key or b"") + len(value or b"")
        for name, header in (headers or {}).items():
            if not isinstance(header, bytes):
                raise TypeError(f"header {name} must be bytes")
            size += len(name) + len(header)
        if size > MESSAGE_MAX_BYTES:
            raise KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))
        records = self.log.setdefault((topic, partition), [])
        message = FakeMessage(topic, partition, len(records), key, value,
                              list((headers or {}).items()))
        records.append(message)
        self._pending.append((on_delivery, message))

    def poll(self, timeout: float = 0) -> int:
        pending, self._pending = self._pending, []
        for callback, message in pending:
            if callback is not None:
                callback(None, message)
        return len(pending)

    def flush(self, timeout: float = 0) -> int:
        self.poll()
        return 0

    def topic(self, topic: str) -> list[FakeMessage]:
        return [m for (t, _), records in self.log.items() if t == topic for m in records]


@dataclass
class FakeConsumer:
    commits: list[list[TopicPartition]] = field(default_factory=list)

    def commit(self, offsets: list[TopicPartition], asynchronous: bool = True) -> None:
        self.commits.append(offsets)

    def committed(self, partitions: list[TopicPartition], timeout: float = 0) -> list[TopicPartition]:
        last = {tp.partition: tp.offset for commit in self.commits for tp in commit}
        return [TopicPartition(tp.topic, tp.partition, last.get(tp.partition, -1001))
                for tp in partitions]

    def incremental_assign(self, partitions: list[TopicPartition]) -> None:
        pass

    def incremental_unassign(self, partitions: list[TopicPartition]) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class FakeRestoreConsumer:
    """Reads the changelog records a `FakeProducer` holds."""

    producer: FakeProducer
    _records: list[FakeMessage] = field(default_factory=list)

    def get_watermark_offsets(self, tp: TopicPartition, timeout: float = 0) -> tuple[int, int]:
        return 0, len(self.producer.log.get((tp.topic, tp.partition), []))

    def assign(self, partitions: list[TopicPartition]) -> None:
        (tp,) = partitions
        records = self.producer.log.get((tp.topic, tp.partition), [])
        start = max(tp.offset, 0)
        self._records = [*records[start:], FakeMessage(tp.topic, tp.partition, len(records),
                                                       None, None, _error=_Eof())]

    def consume(self, num_messages: int = 1, timeout: float = 0) -> list[FakeMessage]:
        batch, self._records = self._records[:num_messages], self._records[num_messages:]
        return batch

    def unassign(self) -> None:
        self._records = []

    def close(self) -> None:
        pass
