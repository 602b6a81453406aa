"""The output of `kvrec bench swap`: the latency by second, the plot and the summary lines."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def per_second(input_s: np.ndarray, latency_ms: np.ndarray) -> dict[str, list[float]]:
    """p50 and p99 of the outputs whose input fell in each second of the replay."""
    second = np.floor(input_s).astype(np.int64)
    found: dict[str, list[float]] = {"second": [], "events": [], "p50_ms": [], "p99_ms": []}
    for value in np.unique(second):
        chosen = latency_ms[second == value]
        found["second"].append(float(value) + 0.5)
        found["events"].append(float(len(chosen)))
        found["p50_ms"].append(round(float(np.percentile(chosen, 50)), 1))
        found["p99_ms"].append(round(float(np.percentile(chosen, 99)), 1))
    return found


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = report["series"]
    t, lat = np.array(series["input_s"]), np.array(series["latency_ms"])
    start = report["replay_started_s"]
    figure, (axis, memory) = plt.subplots(2, 1, figsize=(13, 8), height_ratios=[2, 1])
    axis.scatter(t, np.maximum(lat, 0.1), s=1, alpha=0.15, color="C0", label="one recommendation")
    seconds = report["per_second"]
    axis.plot(seconds["second"], seconds["p99_ms"], color="C3", lw=1, label="p99 per second")
    steady = report["latency_ms"]["steady"]
    axis.axvspan(steady["start_s"] - start, steady["end_s"] - start, color="C2", alpha=0.1,
                 label=f"steady: p99 {steady.get('p99_ms', 0):.0f} ms")
    for swap in report["swaps"]:
        window = swap["latency"]
        axis.axvspan(window["start_s"] - start, window["end_s"] - start, color="C1", alpha=0.15)
        axis.axvline(swap["announced_s"] - start, color="C1", lw=0.8)
        axis.text(swap["announced_s"] - start, 1.01, str(swap["swap"]),
                  transform=axis.get_xaxis_transform(), fontsize=7, ha="center")
    axis.set_yscale("log")
    axis.set_xlabel("input time, s since the replay started (orange: swap windows, numbered)")
    axis.set_ylabel("event to recommendation, ms (log)")
    ratio = report["latency_ms"]["worst_swap_p99_over_steady_p99"]
    axis.set_title(f"latency: worst swap-window p99 / steady p99 = {ratio:.2f}" if ratio else "latency")
    axis.legend(fontsize=8, loc="upper left")
    for name, rss in report["rss_bytes"].items():
        memory.plot(range(1, len(rss["by_swap"]) + 1), np.array(rss["by_swap"]) / 2**20,
                    marker="o", label=f"{name} (last/first {rss['last_over_first']:.3f})")
    memory.set_xticks(range(1, len(report["swaps"]) + 1))
    memory.set_xlabel("swap")
    memory.set_ylabel("worker RSS, MiB")
    memory.legend(fontsize=8)
    settings, machine = report["settings"], report["machine"]
    correctness = report["correctness"]
    figure.suptitle(
        f"kvrec bench swap: {settings['rate']:.0f} ev/s, 2 exactly-once workers, "
        f"{correctness['swaps']} swaps; missing {correctness['missing']}, duplicated "
        f"{correctness['duplicated']}; {machine['cores']} cores, {machine['date_utc'][:10]}"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def summary(report: dict[str, Any]) -> str:
    c, latency = report["correctness"], report["latency_ms"]
    steady = latency["steady"]
    lines = [
        f"inputs {c['inputs']} (topic {c['inputs_in_topic']}), outputs {c['outputs']}, missing "
        f"{c['missing']}, duplicated {c['duplicated']}; version changes per partition "
        f"{c['version_changes_by_partition']} for {c['swaps']} swaps: "
        f"{'OK' if c['ok'] else 'FAILED'}",
        f"steady p50 {steady.get('p50_ms', float('nan')):.1f} ms, p99 "
        f"{steady.get('p99_ms', float('nan')):.1f} ms ({steady['events']} events)",
    ]
    for swap in report["swaps"]:
        w = swap["latency"]
        lines.append(
            f"swap {swap['swap']:2d} {swap['action']:<34} p50 {w.get('p50_ms', float('nan')):7.1f}"
            f"  p99 {w.get('p99_ms', float('nan')):7.1f} ms  ({w['events']} events, "
            f"{swap['seconds_announce_to_last_swap']:.1f}s announce->last swap, p99/steady "
            f"{w.get('p99_over_steady_p99', float('nan')):.2f})"
        )
    if latency["retrain_training"]:
        t = latency["retrain_training"]
        lines.append(f"during the retrain's training (before it announced): p50 "
                     f"{t.get('p50_ms', float('nan')):.1f} ms, p99 {t.get('p99_ms', float('nan')):.1f} ms")
    lines.append(f"worst swap p99 / steady p99: {latency['worst_swap_p99_over_steady_p99']:.2f} "
                 f"(target 2x: {'met' if latency['target_p99_within_2x'] else 'MISSED'})")
    for name, rss in report["rss_bytes"].items():
        lines.append(f"{name} RSS after swap 1 {rss['after_swap_1'] / 2**20:.0f} MiB, after swap "
                     f"{len(rss['by_swap'])} {rss['after_last_swap'] / 2**20:.0f} MiB "
                     f"(x{rss['last_over_first']:.3f})")
    return "\n".join(lines)
