"""Time features (model/events.py `time_codes`, `ModelConfig.time_features`) keep the cache
exact: with each event's time code made once from its own time and its true predecessor's,
`step`, `extend`, `encode_into`/`extend_into` and a refill from the last N*(W-1)+1 stored
events all equal the full sliding-window pass (fp32, 1e-4); codes recomputed from a truncated
window do not. A config written before the field loads with the features off, unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvrec.model.config import ModelConfig
from kvrec.model.encoder import Encoder, KVCache
from kvrec.model.events import (
    DAYS,
    GAP_BUCKETS,
    HOURS,
    TIME_CODES,
    EventInputs,
    sequence_time_codes,
    time_codes,
)
from kvrec.state.kvpool import KVPool, slot_device_bytes

TOLERANCE = 1e-4
Sequence = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # items, types, time codes


def _encoder(layers: int, window: int, seed: int, block: str = "transformer") -> Encoder:
    torch.manual_seed(seed)
    config = ModelConfig(n_items=40, n_event_types=4, d_model=16, n_layers=layers, n_heads=2,
                         window=window, dropout=0.0, block=block, time_features=True)
    encoder = Encoder(config).eval()
    with torch.no_grad():  # time embeddings as large as the items', so a wrong code shows
        for table in (encoder.gap_embedding, encoder.day_embedding, encoder.hour_embedding):
            table.weight.normal_(std=1.0)
    return encoder


def _timestamps(n: int, generator: torch.Generator) -> list[int]:
    gaps = torch.randint(0, 10**7, (n,), generator=generator) * torch.randint(0, 50, (n,),
                                                                                generator=generator)
    return (1_600_000_000_000 + torch.cumsum(gaps, 0)).tolist()


def _histories(lengths: list[int], seed: int) -> list[tuple[torch.Tensor, torch.Tensor, list[int]]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randint(1, 41, (n,), generator=generator),
             torch.randint(1, 5, (n,), generator=generator), _timestamps(n, generator))
            for n in lengths]


def _coded(history, start: int = 0, recompute: bool = False) -> Sequence:
    """Events `start:` of a history with their codes: stored ones (made with each event's
    true predecessor), or, `recompute`, codes made afresh from the suffix alone."""
    items, types, ts = history
    codes = sequence_time_codes(ts[start:]) if recompute else sequence_time_codes(ts)[start:]
    return items[start:], types[start:], torch.tensor(codes, dtype=torch.long)


def _left_pad(rows: list[torch.Tensor]) -> torch.Tensor:
    out = torch.zeros((len(rows), max(1, max(len(r) for r in rows))), dtype=torch.long)
    for i, row in enumerate(rows):
        if len(row):
            out[i, out.shape[1] - len(row):] = row
    return out


def _padded(sequences: list[Sequence]) -> EventInputs:
    return EventInputs(*(_left_pad([s[k] for s in sequences]) for k in range(3)))


def _full_last(encoder: Encoder, sequences: list[Sequence]) -> torch.Tensor:
    events = _padded(sequences)
    return encoder(events.items, events.event_types, events.times)[:, -1]


def _stepped(encoder: Encoder, sequence: Sequence, cache: KVCache | None = None) -> torch.Tensor:
    cache = cache if cache is not None else KVCache.empty(encoder.config, 1)
    vector = None
    for t in range(len(sequence[0])):
        vector, cache, _ = encoder.step(cache, sequence[0][t:t + 1], sequence[1][t:t + 1],
                                        times=sequence[2][t:t + 1])
    assert vector is not None
    return vector[0]


@pytest.mark.parametrize("block", ["transformer", "hstu"])
@pytest.mark.parametrize(("layers", "window", "seed"), [(2, 4, 0), (3, 5, 2), (1, 6, 3)])
@torch.no_grad()
def test_step_with_time_features_equals_the_full_pass(layers: int, window: int, seed: int,
                                                      block: str) -> None:
    encoder = _encoder(layers, window, seed, block)
    sequences = [_coded(h) for h in _histories([1, window, 3 * window + 1], seed)]
    full = _full_last(encoder, sequences)
    stepped = torch.stack([_stepped(encoder, s) for s in sequences])
    assert (stepped - full).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("block", ["transformer", "hstu"])
@torch.no_grad()
def test_extend_in_chunks_with_time_features_equals_the_full_pass(block: str) -> None:
    encoder = _encoder(2, 5, 7, block)
    (sequence,) = [_coded(h) for h in _histories([23], 7)]
    cache, start = KVCache.empty(encoder.config, 1), 0
    for chunk in (3, 5, 1, 4, 5, 5):
        end = start + chunk
        hidden, cache, _ = encoder.extend(cache, sequence[0][None, start:end],
                                          sequence[1][None, start:end], torch.tensor([chunk]),
                                          times=sequence[2][None, start:end])
        full = _full_last(encoder, [tuple(part[:end] for part in sequence)])  # type: ignore[misc]
        assert (hidden[0, chunk - 1] - full[0]).abs().max().item() <= TOLERANCE
        start = end


def _refills(encoder: Encoder, recompute: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The full pass's last vectors, and `encode` over the last N*(W-1)+1 events with codes
    stored (or `recompute`d from those events alone)."""
    needed = encoder.config.history_needed
    histories = _histories([needed * 3, needed + 2, 4 * encoder.config.window], 11)
    full = _full_last(encoder, [_coded(h) for h in histories])
    tails = [_coded(h, len(h[0]) - needed, recompute) for h in histories]
    vectors, _ = encoder.encode(*_padded(tails).tensors())
    return vectors, full


@pytest.mark.parametrize(("layers", "block"), [(2, "transformer"), (3, "transformer"),
                                               (2, "hstu")])
@torch.no_grad()
def test_a_refill_from_stored_codes_is_exact(layers: int, block: str) -> None:
    vectors, full = _refills(_encoder(layers, 4, 11, block), recompute=False)
    assert (vectors - full).abs().max().item() <= TOLERANCE


@torch.no_grad()
def test_a_refill_with_codes_recomputed_from_the_window_is_not_exact() -> None:
    """The broken choice: the refill's first event loses its predecessor (its code says "no
    previous event"). One layer, where the first event is one hop from the last output (deeper
    models dilute it below the tolerance, but not to zero)."""
    vectors, full = _refills(_encoder(1, 4, 11), recompute=True)
    assert (vectors - full).abs().max().item() > 5 * TOLERANCE


@torch.no_grad()
def test_the_pool_primitives_with_time_features_equal_the_full_pass() -> None:
    encoder = _encoder(2, 4, 13)
    needed = encoder.config.history_needed
    histories = _histories([needed + 3, 2 * needed, 9], 13)
    sequences = [_coded(h) for h in histories]
    pool = KVPool(encoder.config, 8 * slot_device_bytes(encoder.config))
    pool.clear_slots(torch.arange(pool.slots))
    slots = torch.tensor([2, 0, 1])
    heads = [tuple(part[:-2] for part in s) for s in sequences]
    encoder.encode_into(pool.kv, pool.vectors, slots, _padded(heads))  # type: ignore[arg-type]
    tails = [tuple(part[-2:] for part in s) for s in sequences]
    new = EventInputs(*(torch.stack([t[k] for t in tails]) for k in range(3)))
    hidden, _ = encoder.extend_into(pool.kv, pool.vectors, slots, new, torch.tensor([2, 2, 2]))
    full = _full_last(encoder, sequences)
    assert (hidden[:, 1] - full).abs().max().item() <= TOLERANCE
    assert (pool.vectors[slots] - full).abs().max().item() <= TOLERANCE


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 10**11), min_size=1, max_size=30), st.data())
def test_a_code_depends_only_on_the_event_and_its_predecessor(gaps: list[int], data) -> None:
    ts = np.cumsum([1_300_000_000_000, *gaps]).tolist()
    whole = sequence_time_codes(ts)
    start = data.draw(st.integers(0, len(ts) - 1))
    before = ts[start - 1] if start else -1
    assert sequence_time_codes(ts[start:], before) == whole[start:]
    assert all(1 <= c <= TIME_CODES for c in whole)
    assert (whole[0] - 1) // (HOURS * DAYS) == 0  # the first event: the "no previous" bucket


def test_codes_read_hour_day_and_gap() -> None:
    monday_9 = 1_700_438_400_000  # 2023-11-20 00:00 UTC, a Monday
    monday_9 += 9 * 3_600_000
    code = time_codes(np.array([monday_9]), np.array([monday_9 - 5_000]))[0] - 1
    assert code % HOURS == 9
    assert (code // HOURS) % DAYS == 0
    assert code // (HOURS * DAYS) == 4  # 4 s <= 5 s < 8 s
    huge = time_codes(np.array([monday_9]), np.array([0]))[0] - 1
    assert huge // (HOURS * DAYS) == GAP_BUCKETS - 1


def test_a_config_without_the_field_loads_with_time_features_off_and_the_same_weights() -> None:
    config = ModelConfig(n_items=10, d_model=16, n_heads=2)
    old = {k: v for k, v in config.to_dict().items() if k != "time_features"}
    loaded = ModelConfig.from_dict(old)
    assert loaded == config and not loaded.time_features
    assert set(Encoder(loaded).state_dict()) == set(Encoder(config).state_dict())
    assert not any("gap" in k or "hour" in k or "day_" in k for k in Encoder(loaded).state_dict())


def test_a_time_model_without_times_is_refused() -> None:
    encoder = _encoder(1, 3, 0)
    with pytest.raises(ValueError, match="times"):
        encoder(torch.tensor([[1, 2]]), torch.tensor([[1, 1]]))


def test_onnx_export_of_a_time_model_is_refused_with_one_line(tmp_path) -> None:
    from kvrec.errors import ArtifactError
    from kvrec.model.export import export_step

    with pytest.raises(ArtifactError, match="time features"):
        export_step(_encoder(1, 3, 0), tmp_path / "m.onnx")


def test_train_and_eval_with_time_features_and_the_worker_refuses_the_model(tmp_path) -> None:
    import json

    from kvrec.errors import ArtifactError
    from kvrec.model.artifact import load_artifact
    from kvrec.stream.cli import main as kvrec
    from kvrec.stream.worker.inference import Recommender

    out = tmp_path / "model"
    data = ["--format", "synthetic", "--synthetic-users", "120", "--synthetic-items", "30",
            "--synthetic-events", "1500"]
    assert kvrec(["train", *data, "--epochs", "1", "--d-model", "16", "--window", "4",
                  "--max-len", "20", "--time-features", "on", "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["model"]["time_features"] is True
    artifact = load_artifact(out)
    assert artifact.config.time_features
    assert kvrec(["eval", "--model", str(out), *data, "--json"]) == 0  # times reach the encoder
    with pytest.raises(ArtifactError, match="time features"):
        Recommender(artifact, None, None, 0)  # type: ignore[arg-type]
    from kvrec.bench.time_features import main as bench

    result_path = tmp_path / "result.json"
    assert bench([*data, "--model", f"time={out}", "--model", f"flat={out}:items-only",
                  "--json", str(result_path)]) == 0
    runs = json.loads(result_path.read_text())["runs"]
    assert [r["next_item"]["users"] for r in runs] == [120, 120]
    assert 0 < runs[0]["next_purchase"]["users"] < 120  # the users whose last event is a purchase
    assert runs[0]["next_item"] != runs[1]["next_item"]  # the items-only reading changes inputs


def test_prepare_gives_each_kept_event_the_code_of_its_kept_predecessor() -> None:
    from kvrec.model.datasets import Interaction
    from kvrec.model.evaluate import prepare

    ts = [1_600_000_000_000 + k * 7_000 * (k + 1) for k in range(6)]
    events = [Interaction("u", "ab"[k % 2], "view", t) for k, t in enumerate(ts)]
    prepared = prepare(events, {"": 0, "a": 1, "b": 2}, {"view": 1})
    codes = sequence_time_codes(ts)
    assert prepared.train_times == [codes[:4]]
    assert prepared.test.input_times == [codes[:5]] and prepared.validation.input_times == [codes[:4]]
