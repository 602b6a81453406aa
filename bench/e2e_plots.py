"""The figures of `kvrec bench e2e --plot`: latency and throughput by system, the
exactly-once curve (visible latency against the commit interval), and the sweep's peaks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kvrec.bench.machine import machine_line


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = report["systems"]
    curve = report.get("exactly_once_curve", [])
    figure, axes = plt.subplots(1, 4 if curve else 3, figsize=(24 if curve else 18, 4.5))
    cdf, bars, rates = axes[:3]
    if curve:
        plot_exactly_once(curve, axes[3])
    for index, (name, result) in enumerate(systems.items()):
        phases = result.get("phases", [])
        if phases:
            rates.plot([p["offered_rate"] for p in phases],
                       [p["achieved_events_per_s"] for p in phases], marker="o",
                       color=f"C{index}", label=name)
    rates.set_xlabel("offered events/s")
    rates.set_ylabel("delivered events/s")
    rates.set_title("throughput against offered rate")
    rates.legend(fontsize=8)
    for name, result in systems.items():
        values = np.sort(np.array(result["latencies_ms"]))
        cdf.plot(values, np.arange(1, len(values) + 1) / len(values),
                 label=f"{name} ({result['offered_rate']:,.0f} ev/s)")
    cdf.set_xscale("log")
    cdf.set_xlabel("event to output latency, ms (log)")
    cdf.set_ylabel("share of events")
    cdf.set_title("latency at a fixed offered rate")
    cdf.legend(fontsize=8)
    names = list(systems)
    peaks = [systems[n]["peak_events_per_s"] for n in names]
    bars.bar(range(len(names)), peaks, color=[f"C{i}" for i in range(len(names))])
    bars.set_xticks(range(len(names)), names, rotation=15, fontsize=8)
    bars.set_yscale("log")
    bars.set_ylabel("events/s draining a backlog (log)")
    bars.set_title("peak throughput")
    settings = report["settings"]
    figure.suptitle(
        f"kvrec bench e2e: {settings['events']} events, {settings['items']} items, "
        f"W={settings['window']}, d={','.join(str(d) for d in settings['d_models'])}, "
        f"{settings['users']} users, {settings['partitions']} partitions; "
        f"{machine_line(report['machine'])}"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_exactly_once(curve: list[dict[str, Any]], axis: Any) -> None:
    """Peak, and visible p99 at the headline rate phase (half the peak unless capped), against
    the commit interval, one line per width."""
    latency = axis.twinx()
    for index, d in enumerate(sorted({p["d_model"] for p in curve})):
        points = [p for p in curve if p["d_model"] == d]
        intervals = [p["commit_interval_ms"] for p in points]
        axis.plot(intervals, [p["peak_events_per_s"] for p in points], marker="o",
                  color=f"C{index}", label=f"peak, d={d}")
        measured = [p for p in points if "visible_ms" in p]
        if measured:
            latency.plot([p["commit_interval_ms"] for p in measured],
                         [p["visible_ms"]["p99"] for p in measured], marker="s", linestyle="--",
                         color=f"C{index}", label=f"visible p99 at the rate phase, d={d}")
            latency.plot([p["commit_interval_ms"] for p in measured],
                         [p["commit_wait_ms"]["p99"] for p in measured], marker="^",
                         linestyle=":", color=f"C{index}",
                         label=f"read - append time (the wait for the commit), p99, d={d}")
    axis.set_xscale("log")
    axis.set_xlabel("--commit-interval-ms (exactly-once)")
    axis.set_ylabel("peak events/s (solid)")
    latency.set_ylabel("ms: visible p99 (dashed), its wait for the commit p99 (dotted)")
    axis.set_ylim(bottom=0)
    latency.set_ylim(bottom=0)
    axis.set_title("exactly-once: the commit interval")
    lines = axis.get_legend_handles_labels()
    more = latency.get_legend_handles_labels()
    axis.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7)


def plot_sweep(sweep: list[dict[str, Any]], items: int, window: int, path: Path,
               machine: dict[str, Any] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for system, marker in (("kvrec", "o"), ("kvrec-no-cache", "s")):
        by_window = sorted((p["window"], p["peak_events_per_s"]) for p in sweep
                           if p["system"] == system and p["items"] == items and p["batch_size"] == 512)
        axes[0].plot(*zip(*by_window, strict=True), marker=marker, label=system)
    by_items = sorted((p["items"], p["peak_events_per_s"]) for p in sweep if p["system"] == "kvrec"
                      and p["window"] == window and p["batch_size"] == 512)
    by_batch = sorted((p["batch_size"], p["peak_events_per_s"]) for p in sweep
                      if p["system"] == "kvrec" and p["window"] == window and p["items"] == items)
    axes[1].plot(*zip(*by_items, strict=True), marker="o", color="C0")
    axes[2].plot(*zip(*by_batch, strict=True), marker="o", color="C0")
    for axis, label in zip(axes, ("window W (events)", "catalog items", "batch size (events)"),
                           strict=True):
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel(label)
        axis.set_ylabel("peak events/s")
    axes[0].legend(fontsize=8)
    axes[0].set_title(f"against W ({items:,} items)")
    axes[1].set_title(f"against catalog size (W={window})")
    axes[2].set_title(f"against batch size (W={window}, {items:,} items)")
    figure.suptitle("kvrec bench e2e --sweep: one worker draining a backlog"
                    + (f"; {machine_line(machine)}" if machine else ""))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
