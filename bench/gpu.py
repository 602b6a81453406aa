"""`kvrec bench gpu`: the model-side path on a GPU, batched `step` + exact top-10 over 1M items.

Events per second for one process: each iteration advances a batch of users by one event
against their key/value caches (on the device) and finds each user's exact top-10 among
`--items` items. The baseline in the same run is plain torch: fp32 matmul + `torch.topk`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from kvrec.bench.machine import machine_info
from kvrec.errors import ConfigError
from kvrec.flags import integer, number
from kvrec.model.config import ModelConfig
from kvrec.model.encoder import Encoder
from kvrec.model.gpu_retrieval import TorchExactRetriever


def _rate(call, events: int, seconds: float, sync) -> float:
    call()
    sync()
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or count < 3:
        call()
        count += 1
    sync()
    return count * events / (time.perf_counter() - started)


@torch.inference_mode()
def run_gpu_bench(
    n_items: int, batches: list[int], window: int, seconds: float, device: str
) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    config = ModelConfig(n_items=n_items, d_model=64, n_layers=2, n_heads=2, window=window, dropout=0.0)
    encoder = Encoder(config).eval().to(device)
    retriever = TorchExactRetriever(encoder.item_embeddings().detach(), device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    return [
        measure_batch(encoder, retriever, batch, seconds, device, sync) for batch in batches
    ]


def measure_batch(
    encoder: Encoder, retriever: TorchExactRetriever, batch: int, seconds: float, device: str, sync
) -> dict[str, Any]:
    config = encoder.config
    items_matrix = encoder.item_embeddings().detach()
    history = torch.randint(1, config.n_items + 1, (batch, config.history_needed - 1), device=device)
    types = torch.randint(1, 5, history.shape, device=device)
    _, cache = encoder.encode(history, types)
    new_items = torch.randint(1, config.n_items + 1, (batch,), device=device)
    new_types = torch.randint(1, 5, (batch,), device=device)
    vectors, _, _ = encoder.step(cache, new_items, new_types, return_attention=True)

    def step_only() -> None:
        encoder.step(cache, new_items, new_types, return_attention=True)

    def kvrec_path() -> None:
        user_vectors, _, _ = encoder.step(cache, new_items, new_types, return_attention=True)
        retriever.search_tensor(user_vectors, 10)

    def plain_topk(queries: torch.Tensor = vectors) -> None:
        for start in range(0, len(queries), 4096):  # chunks keep the score matrix in memory
            torch.topk(queries[start : start + 4096] @ items_matrix.T, 10, dim=1)

    def plain_path() -> None:
        user_vectors, _, _ = encoder.step(cache, new_items, new_types, return_attention=True)
        plain_topk(user_vectors)

    # exactness of the fast top-k against fp32 brute force on this batch
    sample = vectors[:1024]
    want = torch.topk(sample @ items_matrix[1:].T, 10, dim=1).indices + 1
    _, got = retriever.search_tensor(sample, 10)
    recall = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(got, want, strict=True))
    row = {
        "batch": batch,
        "step_events_per_s": _rate(step_only, batch, seconds, sync),
        "step_plus_exact_top10_events_per_s": _rate(kvrec_path, batch, seconds, sync),
        "plain_matmul_topk_queries_per_s": _rate(plain_topk, batch, seconds, sync),
        "plain_step_plus_matmul_topk_events_per_s": _rate(plain_path, batch, seconds, sync),
        "recall@10_vs_fp32_bruteforce": recall / (10 * len(sample)),
    }
    print(json.dumps(row), flush=True)
    return row


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", required=True)
    parser.add_argument("--items", type=integer(1), default=1_000_000)
    parser.add_argument("--batches", default="1024,4096,16384")
    parser.add_argument("--window", type=integer(1), default=50)
    parser.add_argument("--seconds", type=number(above=0), default=3.0)
    parser.add_argument("--device", default="cuda")


def main(args: argparse.Namespace) -> int:
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("kvrec bench gpu: no CUDA device here (use --device cpu to try it)")
    batches = [int(b) for b in args.batches.split(",")]
    rows = run_gpu_bench(args.items, batches, args.window, args.seconds, args.device)
    report = {
        "benchmark": "gpu: batched step + exact top-10",
        "machine": machine_info(),
        "settings": {"items": args.items, "d_model": 64, "layers": 2, "window": args.window,
                     "batches": batches, "device": args.device},
        "results": rows,
    }
    Path(args.json).write_text(json.dumps(report, indent=1))
    return 0
