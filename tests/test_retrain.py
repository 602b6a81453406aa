"""`kvrec retrain`: warm start with a grown catalog, the publish-or-refuse decision (model/,
no Kafka), and the Faust side job against the real broker."""

from __future__ import annotations

import random
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from kvrec.errors import ConfigError
from kvrec.model.artifact import load_artifact, save_artifact
from kvrec.model.datasets import Interaction, SyntheticSpec, generate_synthetic
from kvrec.model.decision import decide, held_out_tail
from kvrec.model.train import TrainSettings, train

TINY = {"d_model": 16, "n_layers": 1, "n_heads": 2, "window": 8, "dropout": 0.1}


def _settings(**overrides: object) -> TrainSettings:
    return replace(TrainSettings(epochs=3, batch_size=64, max_len=20, patience=10), **overrides)


def _data(seed: int = 1, items: int = 80) -> list[Interaction]:
    return generate_synthetic(SyntheticSpec(users=200, items=items, events=4000, seed=seed))


@pytest.fixture(scope="module")
def earlier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("retrain") / "earlier"
    train(_data(), TINY, _settings(), out, progress=False)
    return out


def _grown(data: list[Interaction]) -> list[Interaction]:
    """`data` without the earlier model's items i1..i4 (absent from the new data), plus new
    items and a new event type."""
    kept = [e for e in data if e.item_id not in {"i1", "i2", "i3", "i4"}]
    extra = [Interaction(e.user_id, f"new{k % 7}", "share" if k % 2 else "view", e.ts + 1)
             for k, e in enumerate(kept[:300])]
    return sorted(kept + extra, key=lambda e: e.ts)


def test_warm_start_keeps_known_items_and_appends_new_ones(earlier: Path, tmp_path: Path) -> None:
    before = load_artifact(earlier)
    frozen = _settings(epochs=1, lr=0.0, init_from=earlier)  # lr 0: no step changes a weight
    train(_grown(_data(seed=2)), TINY, frozen, tmp_path / "after", progress=False)
    after = load_artifact(tmp_path / "after")
    old = len(before.item_ids)
    assert after.item_ids[:old] == before.item_ids  # i1..i4 too, though the data lacks them
    assert sorted(after.item_ids[old:]) == [f"new{k}" for k in range(7)]
    assert after.config.n_items == len(after.item_ids) - 1
    old_rows = before.encoder.item_embedding.weight
    assert torch.equal(after.encoder.item_embedding.weight[:old], old_rows)
    new_rows = after.encoder.item_embedding.weight[old:]
    assert new_rows.abs().sum() > 0 and not torch.equal(new_rows, torch.zeros_like(new_rows))
    assert after.event_types[: len(before.event_types)] == before.event_types
    assert after.event_types[len(before.event_types):] == ["share"]
    n_types = len(before.event_types) + 1
    assert torch.equal(after.encoder.type_embedding.weight[:n_types],
                       before.encoder.type_embedding.weight)
    for name, weights in before.encoder.state_dict().items():
        if "embedding" not in name:
            assert torch.equal(after.encoder.state_dict()[name], weights), name


def test_warm_start_refuses_another_shape(earlier: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model shape differs \\(d_model\\)"):
        train(_data(), {**TINY, "d_model": 32}, _settings(init_from=earlier), tmp_path / "x",
              progress=False)


def _scrambled(source: Path, out: Path) -> Path:
    """The earlier model with its item embedding rows shuffled: a deliberately worse one."""
    artifact = load_artifact(source)
    weights = artifact.encoder.item_embedding.weight.data
    order = list(range(1, weights.shape[0]))
    random.Random(0).shuffle(order)
    weights[1:] = weights[order].clone()
    save_artifact(out, artifact.encoder, item_ids=artifact.item_ids,
                  event_types=artifact.event_types, popularity=artifact.popularity,
                  metrics={}, settings={"max_len": 20})
    return out


def test_a_worse_candidate_is_refused_with_both_figures(earlier: Path, tmp_path: Path) -> None:
    serving = load_artifact(earlier)
    worse = load_artifact(_scrambled(earlier, tmp_path / "worse"))
    data = _data()
    decision = decide(worse, serving, data, margin=0.0)
    assert not decision.publish
    assert decision.candidate["ndcg@10"] < decision.serving["ndcg@10"]
    note = decision.note()
    assert f"{decision.candidate['ndcg@10']:.4f}" in note
    assert f"{decision.serving['ndcg@10']:.4f}" in note and note.startswith("refuse")
    # the other way round it is published; a margin wider than the gap lets it through
    better = decide(serving, worse, data)
    assert better.publish and better.reason.endswith("against the serving model's (refused "
                                                     "only below it)")
    gap = decision.serving["ndcg@10"] - decision.candidate["ndcg@10"]
    lenient = decide(worse, serving, data, margin=gap + 0.01)
    assert lenient.publish and lenient.reason.endswith(f"(refused only more than {gap + 0.01:g} "
                                                       "below it)")


def test_the_serving_model_misses_the_items_it_does_not_know(earlier: Path, tmp_path: Path) -> None:
    serving = load_artifact(earlier)
    data = _data()
    tail = held_out_tail(data)
    # the same users, each last event's item renamed to one the serving model never saw
    last = {case.user: len(case.inputs) for case in tail}
    seen: dict[str, int] = {}
    renamed = []
    for e in data:
        k = seen[e.user_id] = seen.get(e.user_id, -1) + 1
        renamed.append(replace(e, item_id="unseen") if last.get(e.user_id) == k else e)
    train(renamed, TINY, _settings(epochs=1, lr=0.0, init_from=earlier), tmp_path / "c",
          progress=False)
    decision = decide(load_artifact(tmp_path / "c"), serving, renamed)
    assert decision.serving_unknown_targets == len(tail) == decision.users
    assert decision.serving["hr@10"] == 0.0 and decision.serving["ndcg@10"] == 0.0
    assert decision.candidate["hr@20"] >= 0.0 and decision.publish


# --- the side job against the real broker ------------------------------------------------

TINY_FLAGS = ["--d-model", "16", "--layers", "1", "--heads", "2", "--window", "8",
              "--max-len", "20", "--batch-size", "64", "--threads", "1", "--web-port", "0",
              "--dropout", "0", "--lr-schedule", "constant", "--warmup-epochs", "0"]


def _walks(users: int, length: int, catalog: int = 60) -> list[Interaction]:
    """Users that walk a catalog one item at a time, each from its own start: a pattern a model
    learns in a few epochs, so a model that lost it is worse by a wide margin, not by noise."""
    rng = random.Random(1)
    return [
        Interaction(f"w{u}", f"sku-{(start + j) % catalog + 1}", "view", 1_700_000_000_000 + j * 1000 + u)
        for u, start in ((u, rng.randrange(catalog)) for u in range(users))
        for j in range(length)
    ]


def _produce(bootstrap: str, topic: str, events: list[Interaction]) -> None:
    from confluent_kafka import Producer

    from kvrec.stream.schema import Event, encode_event

    producer = Producer({"bootstrap.servers": bootstrap, "compression.type": "lz4",
                         "linger.ms": 20})  # LZ4 as `kvrec replay` sends
    for e in events:
        producer.produce(topic, key=e.user_id.encode(),
                         value=encode_event(Event(e.user_id, e.item_id, e.event_type, e.ts)))
    producer.produce(topic, key=b"bad", value=b"{not json")  # counted and skipped
    assert producer.flush(30) == 0


def _retrain(tmp_path: Path, bootstrap: str, name: str, *flags: str) -> tuple[int, str]:
    import os
    import subprocess
    import sys

    log = tmp_path / f"{name}.log"
    root = Path(__file__).resolve().parent.parent
    with log.open("w") as out:
        process = subprocess.run(
            [sys.executable, "-m", "kvrec.stream.cli", "retrain", "--bootstrap-servers", bootstrap,
             "--once", *TINY_FLAGS, *flags],
            cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, stdout=out,
            stderr=subprocess.STDOUT, timeout=240,
        )
    return process.returncode, log.read_text()


@pytest.mark.kafka
def test_retrain_once_publishes_then_refuses_a_worse_model(kafka_bootstrap: str, tmp_path: Path) -> None:
    from kvrec.stream.model_updates import latest_announcement
    from tests.conftest import create_topics, unique_topic

    topic, updates, group = unique_topic("rt-events"), unique_topic("rt-updates"), unique_topic("rt")
    store = tmp_path / "store"
    create_topics(kafka_bootstrap, {topic: 2})
    real = _walks(300, 20)
    _produce(kafka_bootstrap, topic, sorted(real, key=lambda e: e.ts))
    common = ["--input-topic", topic, "--group-id", group, "--updates-topic", updates,
              "--model-store", str(store), "--state-dir", str(tmp_path / "state")]
    status, output = _retrain(tmp_path, kafka_bootstrap, "first", *common,
                              "--epochs", "8", "--lr", "0.01")
    assert status == 0, output[-3000:]
    config = {"bootstrap.servers": kafka_bootstrap}
    first = latest_announcement(config, "default", updates)
    assert first is not None and first.reason == "retrain", output[-3000:]
    assert (store / "default" / first.version / "manifest.json").is_file()
    assert "publish: no serving model" in output
    assert "\x1b" not in output and "\b" not in output  # a log file, not a terminal

    # worse data: new users with random items, trained hard from the serving weights
    rng = random.Random(0)
    items = sorted({e.item_id for e in real})
    start = max(e.ts for e in real) + 60_000
    garbage = [Interaction(f"g{u}", rng.choice(items), "purchase", start + k * 1000 + u)
               for u in range(300) for k in range(20)]
    _produce(kafka_bootstrap, topic, sorted(garbage, key=lambda e: e.ts))
    status, output = _retrain(tmp_path, kafka_bootstrap, "second", *common,
                              "--epochs", "3", "--lr", "0.5")
    assert status == 3, output[-3000:]
    refusal = [line for line in output.splitlines() if line.startswith("refuse:")]
    assert refusal and "serving " + first.version in refusal[-1], output[-3000:]
    figures = re.findall(r"(candidate|serving) \S+ NDCG@10 ([0-9.]+) HR@10 ([0-9.]+)", refusal[-1])
    assert [who for who, _, _ in figures] == ["candidate", "serving"], refusal[-1]
    assert float(figures[0][1]) < float(figures[1][1])
    assert latest_announcement(config, "default", updates) == first  # nothing announced
    assert len(list((store / "default").iterdir())) == 1


@pytest.mark.kafka
def test_a_retrained_version_never_puts_a_refused_one_in_the_history(
        kafka_bootstrap: str, tmp_path: Path) -> None:
    """The announced version no worker served (refused) is not the rollback target after a
    retrain: the history holds the versions the workers reported serving."""
    from kvrec.model.decision import Decision
    from kvrec.model.store import ModelStore
    from kvrec.stream.model_updates import (
        WorkerStatus,
        announce,
        ensure_model_topics,
        first_announcement,
        latest_announcement,
        live_stats_value,
        put,
    )
    from kvrec.stream.retrain.job import JobSettings, _publish
    from tests.conftest import unique_topic
    from tests.worker_fixtures import make_artifact

    config = {"bootstrap.servers": kafka_bootstrap}
    updates, stats = unique_topic("rt-updates"), unique_topic("rt-stats")
    ensure_model_topics(config, updates, stats)
    current = first_announcement("default", "v1", "/s/v1", "d1", "publish").serving(
        "v2", "/s/v2", "d2", "promote")  # v2: refused by the worker, v1 still serves
    announce(config, current, updates)
    put(config, stats, b"default/w1", live_stats_value("w1", {}, WorkerStatus("v1", None, ("v1",))))
    store = ModelStore(tmp_path / "store")
    settings = JobSettings(config, store, updates, _settings(), {}, 0.0, "serve", 0.1,
                           tmp_path / "work", progress=False, stats_topic=stats)
    candidate = make_artifact(tmp_path / "candidate")
    figures = {"hr@10": 0.1, "ndcg@10": 0.05, "hr@20": 0.2, "ndcg@20": 0.06}
    decision = Decision(True, "better", figures, figures, "v2", candidate.version, 0.0, 10)
    announced = _publish(settings, candidate, decision, current)
    assert announced.history == ("v1",)
    assert latest_announcement(config, "default", updates) == announced
