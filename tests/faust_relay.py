"""A faust-streaming app for the round-trip test: an agent in a consumer group that relays
every event of one topic to another. Configured by environment variables; run as
`python -m tests.faust_relay` (SIGTERM stops it gracefully, committing offsets)."""

from __future__ import annotations

import os
import sys

import faust

app = faust.App(
    os.environ["KVREC_TEST_APP_ID"],
    broker=f"kafka://{os.environ['KVREC_TEST_BOOTSTRAP']}",
    value_serializer="raw",
    key_serializer="raw",
    web_enabled=False,
    store="memory://",
    topic_partitions=2,
    topic_allow_declare=False,
    broker_commit_every=10,
    broker_commit_interval=0.5,
    consumer_auto_offset_reset="earliest",
)
source = app.topic(os.environ["KVREC_TEST_IN"], value_serializer="raw", key_serializer="raw")
sink = app.topic(os.environ["KVREC_TEST_OUT"], value_serializer="raw", key_serializer="raw")


@app.agent(source)
async def relay(stream: faust.StreamT) -> None:
    async for key, value in stream.items():
        await sink.send(key=key, value=value)


if __name__ == "__main__":
    sys.argv = [sys.argv[0], "worker", "--loglevel", "warn", "--without-web"]
    app.main()
