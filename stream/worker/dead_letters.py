"""The dead-letter topic: every message the worker cannot apply ends here, with its reason.

Sending a dead letter never fails because of the message: a value longer than the configured
limit is cut to it, a key to 1,024 bytes, and headers say so (`kvrec.truncated`,
`kvrec.original_bytes`, `kvrec.original_key_bytes`). Headers always hold `kvrec.reason`,
`kvrec.detail` (at most 1,000 bytes) and `kvrec.source` ([topic, partition, offset]).
"""

from __future__ import annotations

import json
import logging

from confluent_kafka import Message, Producer

from kvrec.state.partition import QuarantinedWindow
from kvrec.stream.worker.metrics import WorkerMetrics
from kvrec.stream.worker.produce import DeliveryCallback, produce

log = logging.getLogger(__name__)

REASON_HEADER = "kvrec.reason"
DETAIL_HEADER = "kvrec.detail"
SOURCE_HEADER = "kvrec.source"
MAX_KEY_BYTES = 1024  # a key is a user id (at most 256 characters) when valid
MAX_DETAIL_BYTES = 1000

class DeadLetters:
    def __init__(
        self, producer: Producer, topic: str, max_value_bytes: int, metrics: WorkerMetrics,
        on_delivery: DeliveryCallback,
    ) -> None:
        self.producer = producer
        self.topic = topic
        self.max_value_bytes = max_value_bytes
        self.metrics = metrics
        self.on_delivery = on_delivery

    def invalid(self, message: Message, reason: str, detail: str) -> None:
        """An input message that failed validation."""
        self.send(message.key(), message.value(), reason, detail,
                  [message.topic(), message.partition(), message.offset()])

    def processing_error(self, message: Message, exc: Exception) -> None:
        """An input message a later stage raised on."""
        log.warning("dead letter (processing_error) at %s[%d]@%d: %.300r",
                    message.topic(), message.partition(), message.offset(), exc)
        self.invalid(message, "processing_error", f"{type(exc).__name__}: {exc}")

    def corrupt_window(self, window: QuarantinedWindow, changelog_topic: str) -> None:
        """A stored window that did not decode (the user started again from empty)."""
        self.metrics.windows_quarantined.inc()
        self.send(window.user_id.encode(), window.raw, "corrupt_window", window.error,
                  [changelog_topic, window.partition, None])

    def send(
        self, key: bytes | None, value: bytes | None, reason: str, detail: str, source: list
    ) -> None:
        self.metrics.dead_letters.labels(reason).inc()
        headers = {
            REASON_HEADER: reason.encode(),
            DETAIL_HEADER: detail.encode("utf-8", "backslashreplace")[:MAX_DETAIL_BYTES],
            SOURCE_HEADER: json.dumps(source).encode(),
        }
        cut = []
        if value is not None and len(value) > self.max_value_bytes:
            headers["kvrec.original_bytes"] = str(len(value)).encode()
            value = value[: self.max_value_bytes]
            cut.append("value")
        if key is not None and len(key) > MAX_KEY_BYTES:
            headers["kvrec.original_key_bytes"] = str(len(key)).encode()
            key = key[:MAX_KEY_BYTES]
            cut.append("key")
        if cut:
            headers["kvrec.truncated"] = ",".join(cut).encode()
        waits = produce(self.producer, self.topic, key, value, self.on_delivery, headers)
        self.metrics.producer_queue_full.inc(waits)
