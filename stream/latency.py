"""Event-to-output latency as a reader measures it, without the reader's own delay.

An output's latency is its Kafka timestamp minus its input event's Kafka timestamp (the input
message's CreateTime: a recommendation's `source_ts`). The output topics `kvrec demo` and
`kvrec bench e2e` create use `message.timestamp.type=LogAppendTime`, so an output's timestamp is
the time the broker appended it; on a topic with CreateTime it is the time its producer (the
worker) stamped it. Neither is set by the reader: however long the reader takes to get to an
output, the figure is the system's. The reader's own share, the time it read the output minus
that timestamp, is reported beside it. Both are on the clocks of the machines that stamp them
(the broker's or the worker's, and the producer's of the input): on one machine, one clock.

The reader takes outputs as they arrive (`read_available`): one `poll`, then what is already
fetched. `consume(n, timeout)` returns only once it has n messages or the timeout passed, so at
a rate below n/timeout every output waited up to the timeout in the reader: the demo's
`consume(1000, 0.2)` added up to 200 ms to each latency it showed.

Under exactly-once the append time says too little: an output is appended when the worker
produces it, inside a transaction, and a `read_committed` consumer (what every downstream
reader of an exactly-once worker uses) gets it only once that transaction commits, up to
`--commit-interval-ms` later. No timestamp marks the commit, so there the latency is *visible*
latency (`Latencies(visible=True)`): the read time of a `read_committed` reader that takes
outputs as they arrive (`read_available`, `READ_COMMITTED`) minus the input's timestamp, the
reader's own few milliseconds included; the append's latency is kept beside it
(`appended_ms`), and `reader_ms` (read time minus append time) is then the wait for the
commit plus the reader's share.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from confluent_kafka import TIMESTAMP_CREATE_TIME, TIMESTAMP_LOG_APPEND_TIME, Consumer, Message

LOG_APPEND_TIME = {"message.timestamp.type": "LogAppendTime"}  # the output topic's config
STAMP_NAMES = {TIMESTAMP_LOG_APPEND_TIME: "LogAppendTime", TIMESTAMP_CREATE_TIME: "CreateTime"}
READ_TIME = "read time"  # an output without a timestamp: the reader's clock is all there is
VISIBLE = "read time (read_committed)"  # visible latency, under exactly-once (see the module)
READ_COMMITTED = {"isolation.level": "read_committed"}  # a reader of an exactly-once worker


def read_available(consumer: Consumer, timeout: float, most: int = 1000) -> list[Message]:
    """Wait up to `timeout` for one message, then take what is already fetched, without
    waiting (see the module)."""
    first = consumer.poll(timeout)
    if first is None:
        return []
    return [first, *consumer.consume(most - 1, timeout=0)]


def output_stamp(message: Message, read_ms: float) -> tuple[float, str]:
    """The output's timestamp (epoch ms) and which it is; the read time if it has none."""
    kind, stamp_ms = message.timestamp()
    name = STAMP_NAMES.get(kind)
    if name is None or stamp_ms <= 0:
        return read_ms, READ_TIME
    return float(stamp_ms), name


@dataclass
class Latencies:
    """Per output, the system's latency (output stamp - input stamp) and the reader's share
    (read time - output stamp), in ms. With `visible` (exactly-once, see the module) the
    system's latency is read time - input stamp, and `appended_ms` keeps the append's."""

    system_ms: list[float] = field(default_factory=list)
    reader_ms: list[float] = field(default_factory=list)
    stamps: set[str] = field(default_factory=set)
    visible: bool = False
    appended_ms: list[float] = field(default_factory=list)  # output stamp - input stamp

    def add(self, input_ms: float, message: Message, read_ms: float) -> None:
        stamp_ms, name = output_stamp(message, read_ms)
        self.add_stamped(input_ms, stamp_ms, read_ms, name)

    def add_stamped(self, input_ms: float, stamp_ms: float, read_ms: float,
                    name: str = STAMP_NAMES[TIMESTAMP_LOG_APPEND_TIME]) -> None:
        self.appended_ms.append(stamp_ms - input_ms)
        self.reader_ms.append(read_ms - stamp_ms)
        if self.visible:
            self.system_ms.append(read_ms - input_ms)
            self.stamps.add(VISIBLE)
        else:
            self.system_ms.append(stamp_ms - input_ms)
            self.stamps.add(name)

    def __len__(self) -> int:
        return len(self.system_ms)

    @property
    def stamp(self) -> str:
        """Which output timestamp the latencies use (several, comma-separated, if they mixed)."""
        return ", ".join(sorted(self.stamps)) or "none"

    def percentiles(self, quantiles: tuple[int, ...] = (50, 99), last: int | None = None
                    ) -> tuple[dict[str, float], dict[str, float]]:
        """({"p50": ..}, {"p50": ..}) of the system's latency and the reader's share, over the
        `last` outputs (all if None); zeros when there are none."""
        system, reader = self.system_ms, self.reader_ms
        if last is not None:
            system, reader = system[-last:], reader[-last:]
        return _percentiles(system, quantiles), _percentiles(reader, quantiles)


def _percentiles(values: list[float], quantiles: tuple[int, ...]) -> dict[str, float]:
    data = np.asarray(values or [0.0], dtype=np.float64)
    return {f"p{q}": float(np.percentile(data, q)) for q in quantiles}
