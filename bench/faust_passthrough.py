"""A faust-streaming relay for `kvrec bench e2e` (modeled on `tests/faust_relay.py`): an agent
in a consumer group that forwards every message of one topic to another, key and value
unchanged. Configured by environment variables (`KVREC_BENCH_APP_ID`, `KVREC_BENCH_BOOTSTRAP`,
`KVREC_BENCH_IN`, `KVREC_BENCH_OUT`, `KVREC_BENCH_PARTITIONS`); run as
`python -m kvrec.bench.faust_passthrough` (SIGTERM stops it)."""

from __future__ import annotations

import os
import sys

import faust

app = faust.App(
    os.environ["KVREC_BENCH_APP_ID"],
    broker=f"kafka://{os.environ['KVREC_BENCH_BOOTSTRAP']}",
    value_serializer="raw",
    key_serializer="raw",
    web_enabled=False,
    store="memory://",
    topic_partitions=int(os.environ.get("KVREC_BENCH_PARTITIONS", "4")),
    topic_allow_declare=False,
    broker_commit_every=1000,
    broker_commit_interval=1.0,
    consumer_auto_offset_reset="earliest",
)
source = app.topic(os.environ["KVREC_BENCH_IN"], value_serializer="raw", key_serializer="raw")
sink = app.topic(os.environ["KVREC_BENCH_OUT"], value_serializer="raw", key_serializer="raw")


@app.agent(source)
async def relay(stream: faust.StreamT) -> None:
    async for key, value in stream.items():
        await sink.send(key=key, value=value)


if __name__ == "__main__":
    sys.argv = [sys.argv[0], "worker", "--loglevel", "warn", "--without-web"]
    app.main()
