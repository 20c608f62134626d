"""The report of one `tachyon optimize` run: report.md (the figures and how they were made),
report.png (the same figures as bars) and report.json (the raw numbers), written into the new
version's folder."""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from server import __version__, extras
from server.optimize.measure import Comparison, Timing

MARKDOWN, FIGURE, RAW = "report.md", "report.png", "report.json"


@dataclass(frozen=True, slots=True)
class Report:
    model: str
    source_version: int
    version: int
    target: str
    steps: tuple[str, ...]
    data_origin: str
    generated_data: bool
    command: str
    comparison: Comparison


def write(report: Report, folder: Path) -> list[str]:
    """Write the three files; returns warnings (report.png needs matplotlib)."""
    warnings = []
    figure_written = _write_figure(report, folder / FIGURE)
    if not figure_written:
        warnings.append(f"{FIGURE} not written: matplotlib {extras.needs('optimize')}")
    (folder / MARKDOWN).write_text(markdown(report, figure_written), encoding="utf-8")
    (folder / RAW).write_text(json.dumps(raw(report), indent=2) + "\n", encoding="utf-8")
    return warnings


def machine() -> str:
    import onnxruntime as ort

    return (
        f"{platform.system()} {platform.machine()}{_cpu_model()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, ONNX Runtime {ort.__version__}, Tachyon {__version__}"
    )


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return f" ({line.split(':', 1)[1].strip()})"
    except OSError:
        pass
    return ""


def raw(report: Report) -> dict[str, Any]:
    c = report.comparison
    return {
        "model": report.model,
        "source_version": report.source_version,
        "version": report.version,
        "target": report.target,
        "command": report.command,
        "machine": machine(),
        "written": datetime.now(UTC).isoformat(timespec="seconds"),
        "data": report.data_origin,
        "generated_data": report.generated_data,
        "rows": c.rows,
        "steps": list(report.steps),
        "size_bytes": {"source": c.sizes[0], "target": c.sizes[1]},
        "size_ratio": c.sizes[1] / c.sizes[0],
        "accuracy": None if c.accuracy is None else {
            "source": c.accuracy[0], "target": c.accuracy[1], "output": c.label_output,
        },
        "agreement": [asdict(a) for a in c.agreement],
        "latency": _timings(c.latency),
        "throughput": _timings(c.throughput),
        "latency_speedup": speedup(c.latency),
        "throughput_speedup": speedup(c.throughput),
        "intra_op_threads": c.threads,
        "providers": list(c.providers),
    }


def _timings(pair: tuple[Timing, Timing]) -> dict[str, Any]:
    return {
        name: {**asdict(t), "rows_per_s": t.rows_per_s}
        for name, t in zip(("source", "target"), pair, strict=True)
    }


def speedup(pair: tuple[Timing, Timing]) -> float:
    """How many times faster the target runs than the source (< 1: slower)."""
    source, target = pair
    return source.median_s / target.median_s if target.median_s > 0 else float("inf")


def _duration(seconds: float) -> str:
    return f"{seconds * 1e6:.1f} µs" if seconds < 1e-3 else f"{seconds * 1e3:.2f} ms"


def _ms(t: Timing) -> str:
    return f"{_duration(t.median_s)} (p90 {_duration(t.p90_s)})"


def _faster(ratio: float) -> str:
    if abs(ratio - 1) < 0.005:
        return f"{ratio:.2f}x (the same)"
    return f"{ratio:.2f}x ({'faster' if ratio > 1 else 'slower'})"


def _diff(value: float, kind: str) -> str:
    return f"{value:.4g}" if kind == "f" else "-"


def markdown(report: Report, with_figure: bool = True) -> str:
    c = report.comparison
    src, dst = f"version {report.source_version}", f"version {report.version}"
    lines = [
        f"# {report.model}: version {report.version} = {report.target} of version "
        f"{report.source_version}",
        "",
        f"Command: `{report.command}`",
        "",
        f"Machine: {machine()}; {c.threads} intra-op thread(s), {', '.join(c.providers)}.",
        "",
        "## What was done",
        "",
        *(f"- {step}" for step in report.steps),
        "",
        "## Results",
        "",
        f"| | {src} (source) | {dst} ({report.target}) | ratio |",
        "| --- | --- | --- | --- |",
        f"| size on disk | {c.sizes[0]:,} B | {c.sizes[1]:,} B | "
        f"{c.sizes[1] / c.sizes[0]:.2f}x |",
    ]
    if c.accuracy is not None:
        before, after = c.accuracy
        lines.append(
            f"| accuracy ({c.label_output}, {c.rows:,} labelled rows) | {before:.2%} | "
            f"{after:.2%} | {(after - before) * 100:+.2f} points |"
        )
    lat, thr = c.latency, c.throughput
    lines += [
        f"| latency, batch {lat[0].batch}, median | {_ms(lat[0])} | {_ms(lat[1])} | "
        f"{_faster(speedup(lat))} |",
        f"| throughput, batch {thr[0].batch} | {thr[0].rows_per_s:,.0f} rows/s | "
        f"{thr[1].rows_per_s:,.0f} rows/s | {_faster(speedup(thr))} |",
        "",
        f"## Output agreement with {src}",
        "",
        f"On {report.data_origin}.",
    ]
    if report.generated_data:
        lines += [
            "",
            "No --validation data was given: these rows are generated from the input specs, so "
            "they show how closely the outputs agree, not how accurate either version is.",
        ]
    lines += [
        "",
        "| output | rows that agree | rule | max abs diff | mean abs diff |",
        "| --- | --- | --- | --- | --- |",
        *(
            f"| {a.output} | {a.agree:.2%} | {a.rule} | {_diff(a.max_abs_diff, a.kind)} | "
            f"{_diff(a.mean_abs_diff, a.kind)} |"
            for a in c.agreement
        ),
        "",
        "## How it was measured",
        "",
        f"Both versions ran in one process with the same session options; each timing is the "
        f"median of {lat[0].runs} runs (throughput: {thr[0].runs} runs of {thr[0].batch} rows), "
        "the two versions alternating run by run on the same inputs. Size: the model file's "
        "bytes. Latency and throughput are of ONNX Runtime alone, without the server.",
    ]
    if with_figure:
        lines += ["", f"![{report.model} version {report.version}]({FIGURE})"]
    return "\n".join(lines) + "\n"


def _write_figure(report: Report, path: Path) -> bool:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    c = report.comparison
    names = [f"v{report.source_version}", f"v{report.version}\n{report.target}"]
    panels: list[tuple[str, list[float], str]] = [
        ("size on disk (KiB)", [s / 1024 for s in c.sizes], "{:.1f}"),
        (f"latency, batch {c.latency[0].batch} (µs)", [t.median_s * 1e6 for t in c.latency],
         "{:,.1f}"),
        (f"throughput, batch {c.throughput[0].batch} (rows/s)",
         [t.rows_per_s for t in c.throughput], "{:,.0f}"),
    ]
    if c.accuracy is not None:
        panels.append(("accuracy (%)", [a * 100 for a in c.accuracy], "{:.2f}"))
    else:
        top = c.agreement[0]
        panels.append((f"{top.output}: rows that agree (%)", [100.0, top.agree * 100], "{:.1f}"))
    figure = Figure(figsize=(3.2 * len(panels), 3.4))
    axes = figure.subplots(1, len(panels))
    for ax, (title, values, fmt) in zip(axes, panels, strict=True):
        bars = ax.bar(names, values, color=["#8c8c8c", "#2a7ab0"])
        ax.bar_label(bars, labels=[fmt.format(v) for v in values], fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=8)
        ax.margins(y=0.15)
    figure.suptitle(
        f"{report.model}: version {report.version} ({report.target}) vs version "
        f"{report.source_version}", fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=72)
    return True
