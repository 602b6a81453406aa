"""`kvrec bench retrieval`: queries/s and recall@10 against exact search, per index kind.

The catalog is clustered (item vectors around 200 centres plus noise), like trained item
embeddings and unlike uniform noise, where approximate indexes look unrealistically bad.
Queries are catalog vectors with noise. On CUDA, exact top-k in torch is measured too.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.machine import machine_info
from model.retrieval import Retriever, TorchExactRetriever


def clustered_catalog(n_items: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((200, dim)).astype(np.float32)
    vectors = centres[rng.integers(0, 200, n_items)]
    vectors += 0.3 * rng.standard_normal((n_items, dim)).astype(np.float32)
    return np.vstack([np.zeros((1, dim), np.float32), vectors])


def run_retrieval_bench(
    sizes: list[int], kinds: list[str], *, dim: int = 64, batch: int = 512, k: int = 10,
    seconds: float = 2.0, device: str | None = None,
) -> list[dict[str, Any]]:
    rng = np.random.default_rng(1)
    rows = []
    for n_items in sizes:
        items = clustered_catalog(n_items, dim)
        queries = items[rng.integers(1, n_items + 1, batch)]
        queries = queries + 0.3 * rng.standard_normal(queries.shape).astype(np.float32)
        truth = Retriever(items, kind="exact").search(queries, k).indices
        for kind in kinds:
            started = time.perf_counter()
            if kind == "torch-exact":
                index: Any = TorchExactRetriever(items, device=device or "cpu")
            else:
                index = Retriever(items, kind=kind)
            build = time.perf_counter() - started
            index.search(queries, k)
            calls, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds or calls < 2:
                found = index.search(queries, k).indices
                calls += 1
            elapsed = time.perf_counter() - t0
            recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found, truth, strict=True)]))
            row = {"items": n_items, "kind": kind, "queries_per_s": calls * batch / elapsed,
                   "recall@10_vs_exact": recall, "build_seconds": build,
                   "build_report": getattr(index, "build_report", {"device": device})}
            rows.append(row)
            print(f"{n_items:>9,d} {kind:12s} {row['queries_per_s']:>10,.0f} q/s  recall@10 {recall:.3f}",
                  flush=True)
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", required=True)
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--kinds", default="exact,hnsw,ivfpq")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--quick", action="store_true")


def main(args: argparse.Namespace) -> int:
    sizes = [int(s) for s in args.sizes.split(",")]
    kinds = args.kinds.split(",")
    device = "cuda" if torch.cuda.is_available() else None
    if device and "torch-exact" not in kinds:
        kinds.append("torch-exact")
    seconds = args.seconds
    if args.quick:
        sizes, seconds = [5000], 0.2
    rows = run_retrieval_bench(sizes, kinds, batch=args.batch, seconds=seconds, device=device)
    report = {"benchmark": "retrieval", "machine": machine_info(),
              "settings": {"sizes": sizes, "kinds": kinds, "batch": args.batch, "dim": 64, "k": 10,
                           "catalog": "clustered, 200 centres"},
              "results": rows}
    Path(args.json).write_text(json.dumps(report, indent=1))
    return 0
