"""ONNX export of `step`: past keys/values in, new keys/values out, dynamic batch axis.

    kvrec export --model DIR --out step.onnx
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from model.encoder import Encoder, KVCache
from model.errors import ConfigError

INPUTS = ["keys", "values", "positions", "items", "event_types"]
OUTPUTS = ["user_vectors", "new_keys", "new_values", "new_positions", "attention"]


class _Step(nn.Module):
    def __init__(self, encoder: Encoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(
        self, keys: Tensor, values: Tensor, positions: Tensor, items: Tensor, event_types: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        vectors, cache, attention = self.encoder.step(
            KVCache(keys, values, positions), items, event_types, return_attention=True
        )
        assert attention is not None
        return vectors, cache.keys, cache.values, cache.positions, attention


def export_step(encoder: Encoder, path: str | Path, opset: int = 17) -> Path:
    encoder = encoder.eval().cpu()
    example = KVCache.empty(encoder.config, 2)
    example.positions += torch.tensor([0, 7])
    items = torch.tensor([1, 2])
    types = torch.tensor([1, 1])
    batch = {0: "batch"}
    cache_axes = {1: "batch"}
    dynamic_axes = {
        "keys": cache_axes, "values": cache_axes, "positions": batch, "items": batch,
        "event_types": batch, "user_vectors": batch, "new_keys": cache_axes,
        "new_values": cache_axes, "new_positions": batch, "attention": batch,
    }
    out = Path(path)
    with torch.no_grad(), warnings.catch_warnings():
        # `step` is `extend` with T = 1: its checks on T are constants of this graph, whose only
        # dynamic axis is the batch
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module=r"model\.encoder")
        torch.onnx.export(
            _Step(encoder),
            (example.keys, example.values, example.positions, items, types),
            str(out),
            input_names=INPUTS,
            output_names=OUTPUTS,
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            dynamo=False,
        )
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model artifact directory")
    parser.add_argument("--out", required=True, help="ONNX file to write")


def main(args: argparse.Namespace) -> int:
    from model.artifact import load_artifact

    out = Path(args.out)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder: name the ONNX file to write")
    if not out.parent.is_dir():
        raise ConfigError(f"--out {out}: the folder {out.parent} does not exist")
    artifact = load_artifact(args.model)
    path = export_step(artifact.encoder, args.out)
    print(f"exported step of model {artifact.version} to {path}")
    return 0
