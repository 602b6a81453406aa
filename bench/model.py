"""`kvrec bench model`: per-event cost of `step` against re-encoding the window.

A system without a key/value cache must run the encoder over the user's stored window
(N*(W-1)+1 events, what an exact answer needs) on every event; kvrec runs `step` against
the cache. Both are timed in the same run, per backend, for each window W and batch size.
`pool step` is the worker's own call: one event per user against caches in a pool on the
backend's device (`extend_into` on slots of state/kvpool.py: the batch's users scattered over
a pool twice its size), with nothing but the new events and the vectors crossing to the host.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kvrec.bench.machine import machine_info
from kvrec.errors import ConfigError
from kvrec.flags import integer, number
from kvrec.model.backends import BACKENDS, make_backend
from kvrec.model.config import BLOCKS, ModelConfig
from kvrec.model.encoder import Encoder
from kvrec.model.export import export_step
from kvrec.state.kvpool import KVPool, budget_for


def _time(call: Callable[[], object], min_seconds: float, sync: Callable[[], None]) -> float:
    """Median seconds per call over repeats lasting at least `min_seconds` (after a warmup)."""
    call()
    sync()
    samples: list[float] = []
    started = time.perf_counter()
    while time.perf_counter() - started < min_seconds or len(samples) < 3:
        t0 = time.perf_counter()
        call()
        sync()
        samples.append(time.perf_counter() - t0)
        if len(samples) >= 200:
            break
    return statistics.median(samples)


def run_model_bench(
    windows: list[int],
    batches: list[int],
    backends: list[str],
    *,
    d_model: int = 64,
    layers: int = 2,
    n_items: int = 100_000,
    min_seconds: float = 1.0,
    block: str = "transformer",
) -> list[dict[str, Any]]:
    results = []
    for window in windows:
        torch.manual_seed(0)
        config = ModelConfig(
            n_items=n_items, d_model=d_model, n_layers=layers, n_heads=2, window=window,
            dropout=0.0, block=block,
        )
        encoder = Encoder(config).eval()
        onnx_path = None
        if "onnx-cpu" in backends:
            onnx_path = Path(tempfile.mkdtemp()) / "step.onnx"
            export_step(encoder, onnx_path)
        history = config.history_needed
        for backend_name in backends:
            backend = make_backend(backend_name, encoder, onnx_path=onnx_path)
            cuda = backend_name == "torch-cuda"
            sync = torch.cuda.synchronize if cuda else (lambda: None)
            for batch in batches:
                items = torch.randint(1, n_items + 1, (batch, history))
                types = torch.randint(1, 5, (batch, history))
                new_items = torch.randint(1, n_items + 1, (batch,))
                new_types = torch.randint(1, 5, (batch,))
                _, cache = backend.encode(items[:, :-1], types[:, :-1])
                step_s = _time(
                    lambda b=backend, c=cache, i=new_items, t=new_types: b.step(c, i, t, True),
                    min_seconds, sync,
                )
                pool = KVPool(config, budget_for(config, 2 * batch), device=backend.device)
                slots = torch.randperm(pool.slots)[:batch]
                backend.encode_into(pool.kv, pool.vectors, slots, items[:, :-1], types[:, :-1])
                one_each = (new_items.view(-1, 1), new_types.view(-1, 1),
                            torch.ones(batch, dtype=torch.long))
                pool_step_s = _time(
                    lambda b=backend, p=pool, s=slots, e=one_each: b.extend_into(
                        p.kv, p.vectors, s, *e, return_attention=True),
                    min_seconds, sync,
                )
                encode_s = _time(
                    lambda b=backend, i=items, t=types: b.encode(i, t), min_seconds, sync
                )
                row = {
                    "block": block, "backend": backend_name, "window": window, "history_events": history,
                    "batch": batch, "step_us_per_event": step_s / batch * 1e6,
                    "pool_step_us_per_event": pool_step_s / batch * 1e6,
                    "reencode_us_per_event": encode_s / batch * 1e6,
                    "speedup": encode_s / step_s, "pool_speedup": encode_s / pool_step_s,
                }
                results.append(row)
                print(
                    f"{block:11s} {backend_name:10s} W={window:3d} batch={batch:3d}  step "
                    f"{row['step_us_per_event']:9.1f} us/event  pool step "
                    f"{row['pool_step_us_per_event']:9.1f} us/event  re-encode "
                    f"{row['reencode_us_per_event']:10.1f} us/event  x{row['speedup']:.1f} "
                    f"(pool x{row['pool_speedup']:.1f})",
                    flush=True,
                )
    return results


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    windows = sorted({r["window"] for r in results})
    blocks = sorted({r.get("block", "transformer") for r in results})
    figure, axes = plt.subplots(1, len(windows), figsize=(6 * len(windows), 4), squeeze=False)
    for axis, window in zip(axes[0], windows, strict=True):
        for block in blocks:
            for backend in sorted({r["backend"] for r in results}):
                rows = [r for r in results if r["window"] == window and r["backend"] == backend
                        and r.get("block", "transformer") == block]
                name = backend if len(blocks) == 1 else f"{block} {backend}"
                batches = [r["batch"] for r in rows]
                axis.plot(batches, [r["step_us_per_event"] for r in rows], marker="o",
                          label=f"{name} step")
                axis.plot(batches, [r["pool_step_us_per_event"] for r in rows], marker="s",
                          linestyle=":", label=f"{name} pool step")
                axis.plot(
                    batches, [r["reencode_us_per_event"] for r in rows], marker="x",
                    linestyle="--", label=f"{name} re-encode",
                )
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("batch (users per call)")
        axis.set_ylabel("microseconds per event")
        axis.set_title(f"W={window}")
        axis.legend(fontsize=7)
    figure.suptitle("kvrec: step with the key/value cache vs re-encoding the window")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", required=True, help="output JSON")
    parser.add_argument("--plot", default=None, help="output PNG")
    parser.add_argument("--windows", default="50,200")
    parser.add_argument("--batches", default="1,64,512")
    parser.add_argument("--backends", default="auto", help="comma list or auto")
    parser.add_argument("--d-model", type=integer(2), default=64)
    parser.add_argument("--blocks", default="transformer",
                        help=f"comma list of {', '.join(BLOCKS)}: each timed in the same run")
    parser.add_argument("--min-seconds", type=number(above=0), default=1.0, help="timing per measurement")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, seconds (CI smoke)")


def _positive_ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ConfigError(f"{flag} wants a comma list of positive integers, got {text!r}")
    return values


def main(args: argparse.Namespace) -> int:
    windows = _positive_ints(args.windows, "--windows")
    batches = _positive_ints(args.batches, "--batches")
    backends = ["torch-cpu", "onnx-cpu"] + (["torch-cuda"] if torch.cuda.is_available() else [])
    if args.backends != "auto":
        backends = [name.strip() for name in args.backends.split(",") if name.strip()]
        unknown = sorted(set(backends) - set(BACKENDS))
        if unknown or not backends:
            raise ConfigError(f"--backends: unknown {unknown}; choose from {', '.join(BACKENDS)}")
    blocks = [name.strip() for name in args.blocks.split(",") if name.strip()]
    if not blocks or set(blocks) - set(BLOCKS):
        raise ConfigError(f"--blocks: {args.blocks!r}; choose from {', '.join(BLOCKS)}")
    n_items, min_seconds = 100_000, args.min_seconds
    if args.quick:
        windows, batches, n_items, min_seconds = [8], [1, 16], 1000, 0.05
    results = [
        row
        for block in blocks
        for row in run_model_bench(windows, batches, backends, d_model=args.d_model,
                                   n_items=n_items, min_seconds=min_seconds, block=block)
    ]
    report = {
        "benchmark": "model step vs re-encode",
        "machine": machine_info(),
        "settings": {"d_model": args.d_model, "layers": 2, "heads": 2, "n_items": n_items,
                     "blocks": blocks,
                     "windows": windows, "batches": batches, "backends": backends,
                     "min_seconds": min_seconds, "quick": args.quick},
        "results": results,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1))
    if args.plot:
        plot(results, Path(args.plot))
    return 0
