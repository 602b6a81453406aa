"""`kvrec bench model|retrieval|gpu|e2e|loop|train|reference|freshness|restore|takeover|swap|soak|
floor`: benchmarks that write JSON (and a plot)."""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = {
    "model": ("kvrec.bench.model", "step with the cache vs re-encoding the window"),
    "retrieval": ("kvrec.bench.retrieval", "top-k retrieval throughput and recall vs exact"),
    "gpu": ("kvrec.bench.gpu", "batched step + exact top-10 over 1M items on a GPU"),
    "e2e": ("kvrec.bench.e2e", "end to end through Kafka: kvrec vs no cache vs plain relays"),
    "loop": ("kvrec.bench.loop", "the worker loop without a broker: its own ceiling, stage by stage"),
    "train": ("kvrec.bench.train", "trained models side by side: test metrics, time, curves"),
    "reference": ("kvrec.bench.reference_sasrec", "the public reference: SASRec + full CE, run here"),
    "freshness": ("kvrec.bench.freshness", "next-event hit rate: refreshed per event vs nightly vs popular"),
    "restore": ("kvrec.bench.restore", "restoring windows from the changelog: windows/s against size"),
    "takeover": ("kvrec.bench.takeover", "a moved partition serving again: with vs without a standby"),
    "swap": ("kvrec.bench.swap", "hot model swaps under a fixed-rate replay: exactly-once, latency, RSS"),
    "soak": ("kvrec.bench.soak", "one worker for 30 minutes: memory, cache, throughput, p99 over time"),
    "floor": ("kvrec.bench.floor", "the latency floor of bench e2e: Kafka round trips, relay, reader"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name, (module_name, help_text) in BENCHMARKS.items():
        bench_parser = sub.add_parser(name, help=help_text, description=help_text)
        bench_parser.set_defaults(_module=module_name)
        importlib.import_module(module_name).add_arguments(bench_parser)


def main(args: argparse.Namespace) -> int:
    return int(importlib.import_module(args._module).main(args) or 0)
