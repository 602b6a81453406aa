"""`kvrec bench retrieval`: queries/s and recall@10 against exact search, per index kind.

The catalog is clustered like trained item embeddings, not uniform noise (where approximate
indexes look unrealistically bad): about sqrt(n) cluster centres with Zipf-distributed sizes,
items scattered around their centre, and a per-item norm factor (popular items score higher).
Queries are catalog items plus noise; with `exclude`, each query excludes a window of that
many items, half of them from its own exact top (see `bench_queries`).
Recall@10 is measured against exact top-10 with the same exclusions.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from kvrec.bench.machine import machine_info
from kvrec.errors import ConfigError
from kvrec.flags import integer, number
from kvrec.model.gpu_retrieval import TorchExactRetriever
from kvrec.model.progress import progress_bar, progress_line
from kvrec.model.retrieval import KINDS, Retriever, recall_at_k

BENCH_KINDS = (*(k for k in KINDS if k != "auto"), "torch-exact")


def clustered_catalog(n_items: int, dim: int, seed: int = 0) -> np.ndarray:
    """[n_items + 1, dim] float32 item vectors (row 0 = padding, zeros) with cluster structure."""
    rng = np.random.default_rng(seed)
    n_clusters = max(8, int(np.sqrt(n_items)))
    weights = 1.0 / np.arange(1, n_clusters + 1) ** 0.8
    cluster = rng.choice(n_clusters, size=n_items, p=weights / weights.sum())
    centres = rng.standard_normal((n_clusters, dim)).astype(np.float32)
    vectors = centres[cluster] + 0.5 * rng.standard_normal((n_items, dim)).astype(np.float32)
    vectors *= rng.lognormal(0.0, 0.2, size=(n_items, 1)).astype(np.float32)
    return np.vstack([np.zeros((1, dim), np.float32), vectors / np.sqrt(dim)])


def bench_queries(
    items: np.ndarray, batch: int, exclude: int, seed: int = 1
) -> tuple[np.ndarray, list[list[int]] | None]:
    """Perturbed catalog items as user vectors, each with a window of `exclude` seen items.

    Half of a window is every other item of the query's exact top-`exclude` (seen items score
    high, the hard case for exclusion), half is random catalog items.
    """
    rng = np.random.default_rng(seed)
    n_items = len(items) - 1
    picks = rng.integers(1, n_items + 1, batch)
    noise = rng.standard_normal((batch, items.shape[1])).astype(np.float32)
    queries = np.ascontiguousarray(items[picks] + 0.3 * noise * items[1:].std())
    if exclude <= 0:
        return queries, None
    top = Retriever(items, kind="exact").search(queries, exclude).indices[:, ::2]
    far = rng.integers(1, n_items + 1, (batch, exclude - top.shape[1]))
    return queries, [[*a, *b] for a, b in zip(top.tolist(), far.tolist(), strict=True)]


def _rate(search, queries: np.ndarray, k: int, exclude, seconds: float) -> tuple[float, Any]:
    found = search(queries, k, exclude)  # warm-up
    calls, started = 0, time.perf_counter()
    while calls < 2 or time.perf_counter() - started < seconds:
        found = search(queries, k, exclude)
        calls += 1
    return calls * len(queries) / (time.perf_counter() - started), found


def run_retrieval_bench(
    n_items_list: Sequence[int] = (10_000, 100_000, 1_000_000),
    d: int = 64,
    batch: int = 512,
    k: int = 10,
    kinds: Sequence[str] = ("exact", "ivfflat", "ivfpq", "hnsw"),
    device: str = "cpu",
    exclude: int = 0,
    seconds: float = 2.0,
    threads: int = 1,
    json_path: str | Path | None = None,
) -> dict[str, Any]:
    """Measure queries/s and recall@k vs exact per catalog size and kind; write JSON if asked."""
    unknown = [kind for kind in kinds if kind not in BENCH_KINDS]
    if unknown:
        raise ValueError(f"unknown kinds {unknown}; choose from {', '.join(BENCH_KINDS)}")
    torch.set_num_threads(threads)
    rows = []
    progress = progress_bar(total=len(n_items_list) * len(kinds), desc="retrieval bench", unit="index")
    for n_items in n_items_list:
        items = clustered_catalog(n_items, d)
        queries, windows = bench_queries(items, batch, exclude)
        truth = Retriever(items, kind="exact", threads=threads).search(queries, k, windows).indices
        for kind in kinds:
            started = time.perf_counter()
            if kind == "torch-exact":
                index: Any = TorchExactRetriever(items, device=device)
            else:
                index = Retriever(items, kind=kind, approx_threshold=0, threads=threads)
            build_seconds = time.perf_counter() - started
            budget = seconds if n_items * batch < 5e8 or kind != "exact" else min(seconds, 0.5)
            rate, found = _rate(index.search, queries, k, windows, budget)
            row = {
                "items": n_items, "kind": kind, "queries_per_s": round(rate),
                f"recall@{k}_vs_exact": round(recall_at_k(found.indices, truth), 4),
                "build_seconds": round(build_seconds, 2),
                "build_report": getattr(index, "build_report", {"device": device}),
            }
            rows.append(row)
            progress_line(
                f"{n_items:>9,d} {kind:11s} {rate:>10,.0f} q/s  recall@{k} "
                f"{row[f'recall@{k}_vs_exact']:.3f}  build {build_seconds:.1f}s"
            )
            progress.update()
    progress.close()
    report = {
        "benchmark": "retrieval",
        "machine": {**machine_info(), "faiss_threads": faiss.omp_get_max_threads()},
        "settings": {
            "n_items": list(n_items_list), "kinds": list(kinds), "batch": batch, "dim": d, "k": k,
            "exclude_per_query": exclude, "device": device,
            "catalog": "clustered: sqrt(n) Zipf-sized clusters, spread 0.5, lognormal norms",
            "queries": "catalog items + noise",
        },
        "results": rows,
    }
    if json_path is not None:
        Path(json_path).write_text(json.dumps(report, indent=1))
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", required=True, help="where to write the results")
    parser.add_argument("--sizes", default="10000,100000,1000000", help="catalog sizes, comma-separated")
    parser.add_argument("--kinds", default="exact,ivfflat,ivfpq,hnsw",
                        help=f"comma-separated, from {','.join(BENCH_KINDS)}")
    parser.add_argument("--batch", type=integer(1), default=512)
    parser.add_argument("--k", type=integer(1), default=10)
    parser.add_argument("--exclude", type=integer(0), default=0, help="excluded items per query")
    parser.add_argument("--seconds", type=number(above=0), default=2.0, help="time per measurement")
    parser.add_argument("--threads", type=integer(1), default=1, help="faiss and torch threads")
    parser.add_argument("--device", default="cpu", help="device of torch-exact (cpu, cuda)")
    parser.add_argument("--quick", action="store_true", help="one small catalog, short timings")


def main(args: argparse.Namespace) -> int:
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError as error:
        raise ConfigError(f"--sizes must be comma-separated integers: {error}") from None
    kinds = [kind.strip() for kind in args.kinds.split(",") if kind.strip()]
    if any(kind not in BENCH_KINDS for kind in kinds):
        raise ConfigError(f"--kinds: choose from {', '.join(BENCH_KINDS)}, got {args.kinds}")
    if min(sizes) < 100 or args.batch < 1 or args.k < 1 or args.exclude < 0 or args.seconds <= 0 \
            or args.threads < 1:
        raise ConfigError(
            "need --sizes >= 100, --batch >= 1, --k >= 1, --exclude >= 0, --seconds > 0, --threads >= 1"
        )
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device here")
    seconds = args.seconds
    if args.quick:
        sizes, seconds = [5000], 0.2
    run_retrieval_bench(
        sizes, batch=args.batch, k=args.k, kinds=kinds, device=args.device, exclude=args.exclude,
        seconds=seconds, threads=args.threads, json_path=args.json,
    )
    return 0
