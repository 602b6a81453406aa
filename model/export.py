"""ONNX export of `extend` (and so of `step`, which is `extend` by one event): past
keys/values and each user's new events in, new keys/values out; dynamic batch and new-event
axes (1 <= T <= W).

    kvrec export --model DIR --out step.onnx
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from model.encoder import Encoder, KVCache
from model.export_command import check_out

INPUTS = ["keys", "values", "positions", "items", "event_types", "counts"]
OUTPUTS = ["user_vectors", "new_keys", "new_values", "new_positions", "attention"]


class _Extend(nn.Module):
    def __init__(self, encoder: Encoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(
        self, keys: Tensor, values: Tensor, positions: Tensor, items: Tensor, event_types: Tensor,
        counts: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        vectors, cache, attention = self.encoder.extend(
            KVCache(keys, values, positions), items, event_types, counts, return_attention=True
        )
        assert attention is not None
        return vectors, cache.keys, cache.values, cache.positions, attention


def export_step(encoder: Encoder, path: str | Path, opset: int = 17) -> Path:
    """Export `extend` (items [B, T], counts [B]); the file also serves `step` (T = 1)."""
    encoder = encoder.eval().cpu()
    example = KVCache.empty(encoder.config, 2)
    example.positions += torch.tensor([0, 7])
    new = min(2, encoder.config.window)  # traced with T > 1: the general mask and padding path
    items = torch.tensor([[1] * new, [2] * new])
    types = torch.ones_like(items)
    counts = torch.tensor([new, 1])
    batch = {0: "batch"}
    events = {0: "batch", 1: "new_events"}
    cache_axes = {1: "batch"}
    dynamic_axes = {
        "keys": cache_axes, "values": cache_axes, "positions": batch, "items": events,
        "event_types": events, "counts": batch, "user_vectors": events, "new_keys": cache_axes,
        "new_values": cache_axes, "new_positions": batch, "attention": events,
    }
    out = Path(path)
    with torch.no_grad(), warnings.catch_warnings():
        # the checks on T in `extend` are constants of this graph (T <= W holds by contract)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module=r"model\.encoder")
        torch.onnx.export(
            _Extend(encoder),
            (example.keys, example.values, example.positions, items, types, counts),
            str(out),
            input_names=INPUTS,
            output_names=OUTPUTS,
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            dynamo=False,
        )
    return out


def main(args: argparse.Namespace) -> int:
    from model.artifact import load_artifact

    check_out(Path(args.out))  # kvrec export (model/export_command.py) checked it first
    artifact = load_artifact(args.model)
    path = export_step(artifact.encoder, args.out)
    print(f"exported extend/step of model {artifact.version} to {path}")
    return 0
