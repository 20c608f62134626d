"""The report folder of a run: report.md (a table with every point), raw.json (every point's
summary, raw percentiles, latency histogram and server split) and PNG plots (throughput vs p99
latency; the latency histogram of the busiest point)."""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from server import extras
from server.bench.results import PointResult, percentile_ns
from server.bench.runner import Target

REPORT = "report.md"
RAW = "raw.json"
CURVE_PNG = "throughput_latency.png"
HISTOGRAM_PNG = "latency_histogram.png"
COMPARE_MD = "compare.md"
COMPARE_JSON = "compare.json"
COMPARE_PNG = "compare.png"


def machine() -> str:
    return (f"{platform.node()} {platform.machine()}, {os.cpu_count()} cpus, "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}")


def command_line() -> str:
    program = Path(sys.argv[0]).name
    if program == "__main__.py":
        program = "python -m server.bench"
    return " ".join([program, *(shlex.quote(a) for a in sys.argv[1:])])


def default_out(name: str) -> Path:
    return Path("benchmarks") / "results" / f"bench-{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _ms(value: float) -> str:
    return "-" if value != value else f"{value:.3f}"


def _us(value: float) -> str:
    return f"{value:,.0f}"


def errors_text(errors: Mapping[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in errors.items()) or "0"


def table(results: Sequence[PointResult]) -> str:
    """One Markdown row per point: client throughput and latency, then the server's split."""
    open_loop = any(r.point.mode == "open" for r in results)
    head = ["point", "infer/s", "samples/s", "p50 ms", "p90 ms", "p95 ms", "p99 ms", "p99.9 ms",
            "mean ms", "errors"]
    if open_loop:
        head.append("send lag p99 ms")
    head += ["server queue / input / infer / output / overhead us", "avg batch",
             "outside server us"]
    rows = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in results:
        cells = [r.point.label, f"{r.throughput:,.1f}", f"{r.samples_per_s:,.1f}",
                 *(_ms(r.latency_ms(p)) for p in (50, 90, 95, 99, 99.9)), _ms(r.mean_ms),
                 errors_text(r.errors)]
        if open_loop:
            cells.append(_ms(percentile_ns(r.lag_ns, 99) / 1e6))
        s = r.server
        if s is None:
            cells += ["n/a", "n/a", "n/a"]
        else:
            cells += [" / ".join(_us(v) for v in (s.queue_us, s.compute_input_us,
                                                  s.compute_infer_us, s.compute_output_us,
                                                  s.overhead_us)),
                      f"{s.avg_batch:.2f}", _us(r.mean_ms * 1e3 - s.request_us)]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def describe(target: Target, server: str, name: str) -> dict[str, Any]:
    """The run's context for the report: `server` describes it, `name` labels it in plots."""
    scenario = target.scenario
    return {
        "scenario": scenario.describe(),
        "command": command_line(),
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "server": server,
        "server_name": name,
        "url": target.url,
        "protocol": scenario.protocol + (f" ({scenario.http_format})"
                                         if scenario.protocol == "http" else ""),
        "model": {"name": target.model.name, "version": target.model.version,
                  "max_batch_size": target.model.max_batch_size,
                  "inputs": [[t.name, t.datatype, list(t.shape)] for t in target.model.inputs]},
        "data": target.data_source,
        "requests_prebuilt": len(target.payloads),
    }


def markdown(info: Mapping[str, Any], results: Sequence[PointResult]) -> str:
    scenario = info["scenario"]
    batch = info["model"]["max_batch_size"]
    mode = (f"closed loop, concurrency {', '.join(str(c) for c in scenario['concurrency'])}"
            if scenario["concurrency"] else
            f"open loop, {scenario['arrival']} arrivals at "
            f"{', '.join(f'{r:g}' for r in scenario['rate'])} requests/s")
    lines = [
        f"# tachyon bench: {scenario['name']}",
        "",
        f"- command: `{info['command']}`",
        f"- machine: {info['machine']}",
        f"- date: {info['date']}",
        f"- server: {info['server']} at {info['url']}, {info['protocol']}",
        f"- model: {info['model']['name']} (max_batch_size "
        f"{'unknown' if batch is None else batch}), "
        f"data: {info['data']}",
        f"- load: {mode}; {scenario['warmup']:g} s warmup + {scenario['duration']:g} s measured "
        f"per point; {scenario['procs']} client process(es)",
        "",
        table(results),
        "",
        "Latency is measured at the client from the send time (closed loop) or from the "
        "scheduled send time (open loop, so a late send counts against the server: no "
        "coordinated omission); infer/s counts successful responses inside the window. "
        "The server columns are per-request averages from the model's statistics before "
        "and after each window (n/a: the server reports none); 'outside server' is the mean "
        "client latency minus the server's request time (network, protocol, client).",
        "",
    ]
    return "\n".join(lines)


def raw_json(info: Mapping[str, Any], results: Sequence[PointResult]) -> dict[str, Any]:
    return {**info, "points": [{**r.summary(), "raw": r.raw()} for r in results]}


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        print(f"tachyon bench: no plots written: matplotlib {extras.needs('bench')}",
              file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curve(path: Path, series: Mapping[str, Sequence[PointResult]], title: str) -> bool:
    """Throughput (x) against p99 latency (y, with p50 dashed) for each named series."""
    plt = _pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for name, results in series.items():
        ok = [r for r in results if r.latencies_ns.size]
        if not ok:
            continue
        x = [r.throughput for r in ok]
        line = ax.plot(x, [r.latency_ms(99) for r in ok], marker="o", label=f"{name} p99")[0]
        ax.plot(x, [r.latency_ms(50) for r in ok], marker=".", linestyle="--",
                color=line.get_color(), alpha=0.6, label=f"{name} p50")
        for r in ok:
            ax.annotate(r.point.label, (r.throughput, r.latency_ms(99)), fontsize=7,
                        textcoords="offset points", xytext=(3, 4))
    save_latency_plot(plt, fig, ax, path, title, "latency (ms)")
    return True


def save_latency_plot(plt: Any, fig: Any, ax: Any, path: Path, title: str, ylabel: str) -> None:
    """Throughput on x, latency on a log y axis with plain numbers; saved and closed."""
    from matplotlib.ticker import ScalarFormatter

    ax.set_xlabel("throughput (infer/s)")
    ax.set_ylabel(ylabel)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_histogram(path: Path, result: PointResult, title: str) -> bool:
    """Latency distribution of one point, log-spaced bins, with p50 / p99 / p99.9 marked."""
    plt = _pyplot()
    if plt is None or not result.latencies_ns.size:
        return False
    from matplotlib.ticker import ScalarFormatter

    lat_ms = result.latencies_ns / 1e6
    lo, hi = max(float(lat_ms[0]), 1e-3), max(float(lat_ms[-1]), float(lat_ms[0]) * 1.01)
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    ax.hist(lat_ms, bins=np.geomspace(lo, hi * 1.0001, 80), color="#4477aa")
    for p, style in ((50, "-"), (99, "--"), (99.9, ":")):
        ax.axvline(result.latency_ms(p), color="#cc3311", linestyle=style,
                   label=f"p{p:g} {result.latency_ms(p):.3f} ms")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("requests")
    ax.set_title(f"{title}: {result.point.label}, {result.throughput:,.0f} infer/s, "
                 f"{result.latencies_ns.size:,} requests")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def busiest(results: Sequence[PointResult]) -> PointResult:
    return max(results, key=lambda r: r.throughput)


def write(out: Path, info: Mapping[str, Any], results: Sequence[PointResult]) -> list[Path]:
    """Writes the report folder; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / REPORT, out / RAW]
    (out / REPORT).write_text(markdown(info, results))
    (out / RAW).write_text(json.dumps(raw_json(info, results), indent=1))
    name = info["scenario"]["name"]
    series = {info["server_name"]: results}
    if plot_curve(out / CURVE_PNG, series, f"{name}: throughput vs latency"):
        written.append(out / CURVE_PNG)
    if results and plot_histogram(out / HISTOGRAM_PNG, busiest(results), name):
        written.append(out / HISTOGRAM_PNG)
    return written
