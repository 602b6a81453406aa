"""ONNX export of `extend` (and so of `step`, which is `extend` by one event): past
keys/values and each user's new events in, new keys/values out; dynamic batch and new-event
axes (1 <= T <= W). torch's `torch.export`-based exporter (`dynamo=True`), one file.

    kvrec export --model DIR --out step.onnx
"""

from __future__ import annotations

import argparse
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.export import Dim

from kvrec.errors import ArtifactError
from kvrec.model.encoder import Encoder, KVCache
from kvrec.model.export_command import EXPORT_INPUTS, EXPORT_OUTPUTS, check_out

INPUTS = list(EXPORT_INPUTS)
OUTPUTS = list(EXPORT_OUTPUTS)
OPSET = 20  # the default of torch.onnx (its ONNX Script ops are written for 18 and later)


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


def export_step(encoder: Encoder, path: str | Path, opset: int = OPSET) -> Path:
    """Export `extend` (items [B, T], counts [B]); the file also serves `step` (T = 1).

    With torch.export (`dynamo=True`, ONNX Script): one self-contained file (weights inside),
    the batch and new-event axes symbolic."""
    if encoder.config.time_features:
        raise ArtifactError("ONNX export of a model with time features is not supported yet")
    encoder = encoder.eval().cpu()
    example = KVCache.empty(encoder.config, 2)
    example.positions += torch.tensor([0, 7])
    new = min(2, encoder.config.window)  # traced with T > 1: the general mask and padding path
    items = torch.tensor([[1] * new, [2] * new])
    types = torch.ones_like(items)
    counts = torch.tensor([new, 1])
    out = Path(path)
    with torch.no_grad(), _quiet_exporter():
        torch.onnx.export(
            _Extend(encoder).eval(),
            (example.keys, example.values, example.positions, items, types, counts),
            str(out),
            input_names=INPUTS,
            output_names=OUTPUTS,
            dynamic_shapes=_dynamic_shapes(encoder.config.window),
            opset_version=opset,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    return out


def _dynamic_shapes(window: int) -> dict[str, dict[int, Dim]]:
    """The batch axis of every input, and the new-event axis (1 <= T <= W) of the events.

    torch.export decides `extend`'s `T == 1` test on a symbolic size as false and keeps T's
    range 1..W, so the general path (which also serves T = 1) is exported, as the example's
    T = 2 takes it; with W = 1, T is always 1 (a fixed axis, the T = 1 branch). The outputs'
    axes follow from the inputs'."""
    batch = Dim("batch")
    events = {0: batch, 1: Dim("new_events", min=1, max=window)} if window > 1 else {0: batch}
    cache = {1: batch}
    return {
        "keys": cache, "values": cache, "positions": {0: batch}, "items": events,
        "event_types": events, "counts": {0: batch},
    }


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter's chatter that says nothing about this model: that an axis named twice (the
    batch of several inputs, as meant) keeps its first name, and that torchvision's ops are not
    registered (this model has none)."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=r"# The axis name: .* will not be used", category=UserWarning
            )
            yield
    finally:
        registration.setLevel(level)


def main(args: argparse.Namespace) -> int:
    from kvrec.model.artifact import load_artifact

    out = Path(args.out)
    check_out(out)  # kvrec export (model/export_command.py) checked it first, before torch
    artifact = load_artifact(args.model)
    check_out(out)  # again, just before writing: loading a large model takes a while
    path = export_step(artifact.encoder, args.out)
    print(f"exported extend/step of model {artifact.version} to {path}")
    return 0
