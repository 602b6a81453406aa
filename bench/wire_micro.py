"""Decode and encode alone, another checkout's against this one's, alternating in one process on
the same inputs (`kvrec bench loop`'s event shape; batches of 512 events, 10 scored items and 3
`because` entries each): `parse_event` and `WireEncoder.encode_batch`, in µs an event.

    python -m kvrec.bench.wire_micro --old CHECKOUT --json OUT.json   # e.g. `git archive main` unpacked

The two encoders' outputs are checked equal first.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import statistics
import sys
import timeit
from pathlib import Path
from types import ModuleType
from typing import Any

from kvrec.bench.machine import machine_info
from kvrec.stream import schema
from kvrec.stream.worker.wire import WireEncoder

NOW = 1_800_000_000_000
BATCH = 512
TYPES = frozenset({"view", "click", "add_to_cart", "purchase"})


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _per_event(run: Any, rounds: int = 5) -> float:
    return timeit.timeit(run, number=rounds) / rounds / BATCH * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", required=True, help="the other checkout's root")
    parser.add_argument("--json", required=True, help="write the result here")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    old_schema = _load("old_schema", Path(args.old) / "stream/schema.py")
    old_wire = _load("old_wire", Path(args.old) / "stream/worker/wire.py")
    rng = random.Random(0)
    messages = []
    for n in range(BATCH):
        user, item = f"u{rng.randrange(1000)}", f"i{rng.randrange(1, 100_001)}"
        value = schema.encode_event(schema.Event(user, item, "view", NOW - 3_600_000 + n))
        messages.append((value, user.encode()))
    item_ids = [f"i{n}" for n in range(100_001)]
    columns = (
        [f"u{rng.randrange(1000)}" for _ in range(BATCH)],
        [[rng.randrange(1, 100_001) for _ in range(10)] for _ in range(BATCH)],
        [[round(rng.gauss(0, 3), 6) for _ in range(10)] for _ in range(BATCH)],
        [[(rng.randrange(1, 100_001), 1, round(rng.random(), 4)) for _ in range(3)]
         for _ in range(BATCH)],
        [False] * BATCH, [NOW + i for i in range(BATCH)], NOW, [NOW + i for i in range(BATCH)],
    )
    encoders = {"old": old_wire.WireEncoder("v1", item_ids, ["view", "click"]),
                "new": WireEncoder("v1", item_ids, ["view", "click"])}
    outputs = [encoder.encode_batch(*columns) for encoder in encoders.values()]
    assert outputs[0] == outputs[1], "the encoders differ"
    parsers = {"old": old_schema.parse_event, "new": schema.parse_event}

    def decode(parse: Any) -> None:
        for raw, key in messages:
            parse(raw, key, event_types=TYPES, max_bytes=16_384, now_ms=NOW, max_future_ms=300_000)

    found: dict[str, list[float]] = {f"{stage} {side}": [] for stage in ("decode", "encode")
                                     for side in ("old", "new")}
    for _ in range(args.rounds):
        for side in ("old", "new"):
            found[f"decode {side}"].append(_per_event(lambda p=parsers[side]: decode(p)))
            found[f"encode {side}"].append(
                _per_event(lambda e=encoders[side]: e.encode_batch(*columns)))
    result = {
        "benchmark": "parse_event and WireEncoder.encode_batch, another checkout's against this one's",
        "machine": machine_info(), "old": str(args.old), "rounds": args.rounds,
        "us_per_event": {k: {"median": round(statistics.median(v), 3), "min": round(min(v), 3)}
                         for k, v in found.items()},
    }
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    for name, times in found.items():
        print(f"{name}: median {statistics.median(times):.2f} µs/event, min {min(times):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
