"""The report folder of `tachyon bench tune`: report.md (every trial, the best marked),
trials.json, a PNG of throughput against p99 for every trial with the budget drawn, and the
best config.pbtxt."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from server.bench.report import _pyplot, save_latency_plot
from server.bench.tune import Trial

REPORT = "report.md"
RAW = "trials.json"
PLOT = "tune.png"
CONFIG = "config.pbtxt"


def _ms(value: float) -> str:
    return "-" if value != value else f"{value:.2f}"


def versus_baseline(trials: Sequence[Trial], chosen: Trial) -> str:
    """' (1.8x the model's own config: 2,900 infer/s, p99 8.1 ms)', or '' without one."""
    own = next((t for t in trials if t.baseline and not t.failure and t.throughput > 0), None)
    if own is None or own is chosen:
        return ""
    return (f" ({chosen.throughput / own.throughput:.2f}x the model's own config "
            f"{own.config.label}: {own.throughput:,.1f} infer/s, p99 {own.p99_ms:.2f} ms)")


def table(trials: Sequence[Trial], budget_ms: float, chosen: Trial | None) -> str:
    head = ["trial", "max_batch_size", "max_queue_delay_us", "instances", "threads", "infer/s",
            "p50 ms", "p99 ms", "errors", "within budget"]
    rows = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    number = 0
    for t in trials:
        c = t.config
        number += 0 if t.baseline else 1
        verdict = "**best**" if t is chosen else ("yes" if t.within(budget_ms) else "no")
        if t.failure:
            verdict = f"failed: {t.failure.splitlines()[0][:120]}"
        rows.append("| " + " | ".join([
            "own config" if t.baseline else str(number), str(c.max_batch_size), str(c.delay_us),
            str(c.instances),
            "-" if c.threads is None else str(c.threads), f"{t.throughput:,.1f}",
            _ms(t.p50_ms), _ms(t.p99_ms), str(t.errors), verdict]) + " |")
    return "\n".join(rows)


def markdown(info: Mapping[str, Any], trials: Sequence[Trial], chosen: Trial | None) -> str:
    budget = float(info["p99_ms"])
    verdict = (f"best: {chosen.config.label}: {chosen.throughput:,.1f} infer/s at p99 "
               f"{chosen.p99_ms:.2f} ms (budget {budget:g} ms)"
               f"{versus_baseline(trials, chosen)}; written: {info['written']}"
               if chosen else f"no trial met p99 <= {budget:g} ms: no config written")
    return "\n".join([
        f"# tachyon bench tune: {info['model']}",
        "",
        f"- command: `{info['command']}`",
        f"- machine: {info['machine']}",
        f"- date: {info['date']}",
        f"- server: tachyon serve on a scratch copy of {info['model_dir']}, each config "
        "reloaded through the repository API",
        f"- load per trial: closed loop, concurrency {info['concurrency']}, {info['protocol']}, "
        f"{info['warmup_s']:g} s warmup + {info['duration_s']:g} s measured, data: "
        f"{info['data']}",
        f"- search: {info['search']} over {info['space']} ({len(trials) - 1} trials, after the "
        f"model's own config); objective: highest infer/s with p99 <= {budget:g} ms and no "
        "errors",
        "",
        table(trials, budget, chosen),
        "",
        verdict,
        "",
    ])


def raw(info: Mapping[str, Any], trials: Sequence[Trial], chosen: Trial | None) -> dict[str, Any]:
    def one(t: Trial) -> dict[str, Any]:
        return {"max_batch_size": t.config.max_batch_size, "delay_us": t.config.delay_us,
                "instances": t.config.instances, "threads": t.config.threads,
                "infer_per_s": round(t.throughput, 2),
                "p50_ms": None if t.p50_ms != t.p50_ms else round(t.p50_ms, 4),
                "p99_ms": None if t.p99_ms != t.p99_ms else round(t.p99_ms, 4),
                "errors": t.errors, "failure": t.failure, "best": t is chosen,
                "own_config": t.baseline}

    return {**info, "trials": [one(t) for t in trials]}


def plot(path: Path, trials: Sequence[Trial], budget_ms: float, chosen: Trial | None,
         title: str) -> bool:
    """Each measured trial at (throughput, p99), labelled, the budget as a line, the best
    ringed."""
    plt = _pyplot()
    measured = [t for t in trials if not t.failure and t.p99_ms == t.p99_ms]
    if plt is None or not measured:
        return False
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    colors = ["#228833" if t.within(budget_ms) else "#aa3377" for t in measured]
    ax.scatter([t.throughput for t in measured], [t.p99_ms for t in measured], c=colors)
    for t in measured:
        ax.annotate(t.config.label, (t.throughput, t.p99_ms), fontsize=7,
                    textcoords="offset points", xytext=(3, 3))
    if chosen is not None:
        ax.plot([chosen.throughput], [chosen.p99_ms], marker="o", markersize=14,
                fillstyle="none", color="#228833", label=f"best: {chosen.config.label}")
    ax.axhline(budget_ms, color="#cc3311", linestyle="--", label=f"p99 budget {budget_ms:g} ms")
    save_latency_plot(plt, fig, ax, path, title, "p99 latency (ms)")
    return True


def write(out: Path, info: Mapping[str, Any], trials: Sequence[Trial], chosen: Trial | None,
          config_text: str | None) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT).write_text(markdown(info, trials, chosen))
    (out / RAW).write_text(json.dumps(raw(info, trials, chosen), indent=1))
    written = [out / REPORT, out / RAW]
    if plot(out / PLOT, trials, float(info["p99_ms"]), chosen,
            f"{info['model']}: throughput vs p99 per config"):
        written.append(out / PLOT)
    if config_text is not None:
        (out / CONFIG).write_text(config_text)
        written.append(out / CONFIG)
    return written
