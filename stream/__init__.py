"""Kafka and the loops: the worker (`worker/`), the event and recommendation schemas, replay,
tail, the demo and the `kvrec` command line."""
