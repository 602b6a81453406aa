"""librdkafka's log lines through Python logging, without the flood.

Every client made from `kafka_config.client_config` logs to the `kvrec.kafka` logger (the
client setting `logger`), so its lines follow `--log-format` like the command's own. Left to
itself, a client that cannot reach its broker writes one line per connection attempt, about
20 a second per client, forever. Here:

- a failed connection attempt (librdkafka's facility `FAIL`) is not logged; the newest one's
  text is kept as the reason the command gives in its own one line about reaching Kafka
  (`kafka_config.wait_for_kafka`);
- a transaction error (facility `TXNERR`) caused by a rebalance (`REBALANCE_CODES`: the group's
  generation moved on under the transaction's offsets) is a WARNING, not an ERROR: the worker
  handles it (the transaction is aborted and the work replayed, `stream/worker/loop.py`), and
  an ERROR line means a person must act;
- any other warning or error of the same text (the broker's name, the milliseconds aside) is
  logged at most once per `REPEAT_S`. The worker's consumer errors go through it too.
"""

from __future__ import annotations

import logging
import re
import time

LOGGER_NAME = "kvrec.kafka"
REPEAT_S = 60.0
LIBRDKAFKA_FORMAT = "%s [%s] %s"  # how confluent-kafka logs: facility, client name, text
# a transaction failed because the group rebalanced: handled by replaying, never a person's job
REBALANCE_CODES = ("ILLEGAL_GENERATION", "REBALANCE_IN_PROGRESS", "UNKNOWN_MEMBER_ID")
_VARIABLE = re.compile(r"\s*\(after \d+ms in state \w+[^)]*\)|\d+ms|\[thrd:[^\]]*\]:\s*")


def librdkafka_parts(record: logging.LogRecord) -> tuple[str, str, str] | None:
    """(facility, client, text) of a librdkafka line, None for any other record."""
    args = record.args
    if record.msg == LIBRDKAFKA_FORMAT and isinstance(args, tuple) and len(args) == 3:
        return str(args[0]), str(args[1]), str(args[2])
    return None


def handled_by_the_worker(facility: str, text: str) -> bool:
    """Whether a librdkafka error line is one the worker handles on its own (a transaction
    aborted by a rebalance, then replayed)."""
    return facility == "TXNERR" and any(code in text for code in REBALANCE_CODES)


def connection_reason(text: str) -> str:
    """`[thrd:..]: b:9092/bootstrap: Connect to ipv4#... failed: Connection refused (after 0ms
    in state CONNECT)` -> `Connect to ipv4#... failed: Connection refused`."""
    text = _VARIABLE.sub(" ", text).strip()
    head, _, rest = text.partition(": ")
    return rest if rest and "/" in head else text


class KafkaLogFilter(logging.Filter):
    """Drops failed connection attempts (keeping the newest reason) and repeats."""

    def __init__(self, repeat_s: float = REPEAT_S) -> None:
        super().__init__()
        self.repeat_s = repeat_s
        self.last_logged: dict[str, float] = {}
        self.connection_problem: str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        parts = librdkafka_parts(record)
        if parts is not None and parts[0] == "FAIL":
            self.connection_problem = connection_reason(parts[2])
            return False
        if parts is not None and record.levelno > logging.WARNING and handled_by_the_worker(
            parts[0], parts[2]
        ):
            record.levelno, record.levelname = logging.WARNING, logging.getLevelName(logging.WARNING)
        if record.levelno < logging.WARNING:
            return True
        key = _VARIABLE.sub(" ", parts[2] if parts else record.getMessage())
        now = time.monotonic()
        if now - self.last_logged.get(key, -self.repeat_s) < self.repeat_s:
            return False
        if len(self.last_logged) > 1_000:  # forget texts not seen for a while
            self.last_logged = {k: t for k, t in self.last_logged.items() if now - t < self.repeat_s}
        self.last_logged[key] = now
        return True


kafka_log = logging.getLogger(LOGGER_NAME)
kafka_log_filter = KafkaLogFilter()
kafka_log.addFilter(kafka_log_filter)
