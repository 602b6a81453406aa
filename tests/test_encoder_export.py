"""ONNX export of `extend` and `step`: parity with torch within 1e-4; backends share one contract."""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import pytest
import torch

from kvrec.errors import ConfigError
from kvrec.model.backends import make_backend
from kvrec.model.config import ModelConfig
from kvrec.model.encoder import Encoder
from kvrec.model.export import INPUTS, OUTPUTS, export_step


@pytest.fixture(scope="module",
                params=[("dot", "transformer"), ("cosine", "transformer"), ("dot", "hstu")])
def exported(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> tuple[Encoder, Path]:
    torch.manual_seed(0)
    similarity, block = request.param
    config = ModelConfig(n_items=50, d_model=32, n_layers=2, n_heads=2, window=6, dropout=0.0,
                         similarity=similarity, block=block)
    encoder = Encoder(config).eval()
    return encoder, export_step(encoder, tmp_path_factory.mktemp("onnx") / "step.onnx")


@pytest.mark.parametrize("batch", [1, 7])
def test_onnx_step_matches_torch(exported: tuple[Encoder, Path], batch: int) -> None:
    encoder, path = exported
    torch_backend = make_backend("torch-cpu", encoder)
    onnx_backend = make_backend("onnx-cpu", encoder, onnx_path=path)
    generator = torch.Generator().manual_seed(batch)
    items = torch.randint(1, 51, (batch, 11), generator=generator)
    items[0, :4] = 0  # one shorter user
    types = torch.randint(1, 5, (batch, 11), generator=generator)
    _, cache = torch_backend.encode(items, types)
    for step in range(3):
        new_items = torch.randint(1, 51, (batch,), generator=generator)
        new_types = torch.randint(1, 5, (batch,), generator=generator)
        want = torch_backend.step(cache, new_items, new_types, return_attention=True)
        got = onnx_backend.step(cache, new_items, new_types, return_attention=True)
        assert (want[0] - got[0]).abs().max().item() <= 1e-4, step
        assert (want[1].keys - got[1].keys).abs().max().item() <= 1e-4
        assert (want[1].values - got[1].values).abs().max().item() <= 1e-4
        assert torch.equal(want[1].positions, got[1].positions)
        assert (want[2] - got[2]).abs().max().item() <= 1e-4
        cache = want[1]


def _axes(value: onnx.ValueInfoProto) -> list[str | int]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def test_exported_graph_has_the_names_and_axes_the_backend_reads(
    exported: tuple[Encoder, Path],
) -> None:
    """One self-contained file; inputs and outputs by the names `OnnxBackend` feeds and reads,
    the batch and new-event axes symbolic, the cache's other axes fixed by the model."""
    encoder, path = exported
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no external weights
    graph = onnx.load(str(path)).graph
    cfg = encoder.config
    cache = [cfg.n_layers, "batch", cfg.n_heads, cfg.window, cfg.head_dim]
    assert {i.name: _axes(i) for i in graph.input} == {
        "keys": cache, "values": cache, "positions": ["batch"],
        "items": ["batch", "new_events"], "event_types": ["batch", "new_events"],
        "counts": ["batch"],
    }
    assert [i.name for i in graph.input] == INPUTS
    assert {o.name: _axes(o) for o in graph.output} == {
        "user_vectors": ["batch", "new_events", cfg.d_model], "new_keys": cache,
        "new_values": cache, "new_positions": ["batch"],
        "attention": ["batch", "new_events", cfg.window],
    }
    assert [o.name for o in graph.output] == OUTPUTS


def test_export_uses_no_deprecated_exporter(tmp_path: Path) -> None:
    """Nothing torch will remove: no DeprecationWarning or FutureWarning from the export."""
    config = ModelConfig(n_items=20, d_model=16, n_layers=1, n_heads=2, window=4, dropout=0.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_step(Encoder(config), tmp_path / "step.onnx")
    deprecated = [f"{w.category.__name__}: {w.message}" for w in caught
                  if issubclass(w.category, (DeprecationWarning, FutureWarning))]
    assert deprecated == []


def test_a_window_of_one_exports_step(tmp_path: Path) -> None:
    """W = 1: one new event at most, so the new-event axis is fixed at 1 (not a 1..1 range)."""
    torch.manual_seed(0)
    config = ModelConfig(n_items=20, d_model=16, n_layers=2, n_heads=2, window=1, dropout=0.0)
    encoder = Encoder(config).eval()
    torch_backend = make_backend("torch-cpu", encoder)
    onnx_backend = make_backend("onnx-cpu", encoder,
                                onnx_path=export_step(encoder, tmp_path / "step.onnx"))
    _, cache = torch_backend.encode(torch.randint(1, 21, (3, 4)), torch.randint(1, 5, (3, 4)))
    new_items, new_types = torch.randint(1, 21, (3,)), torch.randint(1, 5, (3,))
    want = torch_backend.step(cache, new_items, new_types, return_attention=True)
    got = onnx_backend.step(cache, new_items, new_types, return_attention=True)
    assert (want[0] - got[0]).abs().max().item() <= 1e-4
    assert (want[1].keys - got[1].keys).abs().max().item() <= 1e-4
    assert torch.equal(want[1].positions, got[1].positions)
    assert (want[2] - got[2]).abs().max().item() <= 1e-4


def test_backend_errors_are_clear(exported: tuple[Encoder, Path], tmp_path: Path) -> None:
    encoder, _ = exported
    with pytest.raises(ConfigError, match="unknown backend"):
        make_backend("tpu", encoder)
    with pytest.raises(ConfigError, match="not found"):
        make_backend("onnx-cpu", encoder, onnx_path=tmp_path / "missing.onnx")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            make_backend("torch-cuda", encoder)


@pytest.mark.parametrize(("batch", "new"), [(1, 1), (5, 3), (4, 6)])
def test_onnx_extend_matches_torch(exported: tuple[Encoder, Path], batch: int, new: int) -> None:
    """Several new events per user in one ONNX call (T up to W, right-padded, counts vary)."""
    encoder, path = exported
    torch_backend = make_backend("torch-cpu", encoder)
    onnx_backend = make_backend("onnx-cpu", encoder, onnx_path=path)
    assert onnx_backend.max_extend is None
    generator = torch.Generator().manual_seed(10 * batch + new)
    items = torch.randint(1, 51, (batch, 9), generator=generator)
    items[0, :5] = 0  # one shorter user
    _, cache = torch_backend.encode(items, torch.randint(1, 5, (batch, 9), generator=generator))
    for round_ in range(2):
        new_items = torch.randint(1, 51, (batch, new), generator=generator)
        new_types = torch.randint(1, 5, (batch, new), generator=generator)
        counts = torch.randint(1, new + 1, (batch,), generator=generator)
        counts[0] = new
        new_items[torch.arange(new).view(1, -1) >= counts.view(-1, 1)] = 0  # right padding
        want = torch_backend.extend(cache, new_items, new_types, counts, return_attention=True)
        got = onnx_backend.extend(cache, new_items, new_types, counts, return_attention=True)
        real = torch.arange(new).view(1, -1) < counts.view(-1, 1)
        assert (want[0] - got[0])[real].abs().max().item() <= 1e-4, round_
        assert (want[1].keys - got[1].keys).abs().max().item() <= 1e-4
        assert (want[1].values - got[1].values).abs().max().item() <= 1e-4
        assert torch.equal(want[1].positions, got[1].positions)
        assert (want[2] - got[2])[real].abs().max().item() <= 1e-4
        cache = want[1]
