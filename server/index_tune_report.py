"""The report of `tachyon index tune`: a Markdown table (every candidate's sweep), a JSON file
with the same numbers, and a PNG plot of recall against queries per second."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from server import extras
from server.index_sweep import Candidate

REPORT = "report.md"
RAW = "tune.json"
PLOT = "recall_qps.png"


def _mib(size: int) -> str:
    return f"{size / 2**20:,.1f}"


def _value(candidate: Candidate, value: int | None) -> str:
    return "-" if value is None else f"{candidate.parameter}={value}"


def table(candidates: Sequence[Candidate], target: float, chosen: Candidate | None) -> str:
    head = ["index", "setting", "recall (tuning)", "recall - margin", "queries/s", "MiB",
            "meets", "held-out recall"]
    rows = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for c in candidates:
        for p in c.points:
            picked = p is c.chosen
            mark = "**chosen**" if picked and c is chosen else ("yes" if picked else "")
            held = f"{c.holdout_recall:.4f}" if picked and c.holdout_recall is not None else ""
            rows.append("| " + " | ".join([
                f"{c.name} ({c.kind})", _value(c, p.value), f"{p.recall:.4f}",
                f"{p.recall_low:.4f}", f"{p.qps:,.0f}", _mib(c.memory_bytes),
                mark or ("no" if p.recall_low < target else ""), held]) + " |")
    return "\n".join(rows)


def markdown(info: Mapping[str, Any], candidates: Sequence[Candidate],
             chosen: Candidate | None) -> str:
    target = float(info["recall"])
    verdict = "no index meets the recall: nothing written"
    if chosen is not None and chosen.chosen is not None:
        verdict = (f"chosen: {chosen.name}, {_value(chosen, chosen.chosen.value)}: recall "
                   f"{chosen.chosen.recall:.4f} on {info['tuning_queries']} tuning queries, "
                   f"{chosen.holdout_recall:.4f} on {info['holdout_queries']} held-out "
                   f"queries, {chosen.chosen.qps:,.0f} queries/s, "
                   f"{_mib(chosen.memory_bytes)} MiB")
    lines = [
        f"# tachyon index tune: {info['model']}",
        "",
        f"- command: `{info['command']}`",
        f"- machine: {info['machine']}",
        f"- date: {info['date']}",
        f"- source: version {info['source_version']}, {info['count']:,} vectors of dimension "
        f"{info['dimension']}, metric {info['metric']}; exact neighbours from "
        f"{info['exact_from']}",
        f"- target: recall@{info['k']} >= {target} on the tuning queries, less "
        f"{info['sigmas']:g} standard errors over the queries (margin), then checked on the "
        "held-out queries",
        f"- queries: {info['queries']}",
        f"- speed: in-process `index.search`, batches of {info['batch']} queries, "
        f"{info['threads']} OpenMP thread(s), at least {info['measure_s']:g} s a point; "
        "candidates meeting the recall are compared on their chosen point measured again, 3x as "
        "long; memory: the serialized index",
        f"- objective: {info['optimize']}",
        "",
        table(candidates, target, chosen),
        "",
        verdict,
        "",
    ]
    return "\n".join(lines)


def raw(info: Mapping[str, Any], candidates: Sequence[Candidate],
        chosen: Candidate | None) -> dict[str, Any]:
    return {
        **info,
        "chosen": None if chosen is None else chosen.name,
        "candidates": [{
            "name": c.name, "kind": c.kind, "memory_bytes": c.memory_bytes,
            "parameter": c.parameter,
            "chosen": None if c.chosen is None else c.chosen.value,
            "holdout_recall": c.holdout_recall,
            "points": [{"value": p.value, "recall": round(p.recall, 5),
                        "recall_low": round(p.recall_low, 5), "qps": round(p.qps, 1)}
                       for p in c.points],
        } for c in candidates],
    }


def plot(candidates: Sequence[Candidate], target: float, title: str) -> bytes | None:
    """Recall (y) against queries per second (x, log), one line per candidate, the chosen
    points ringed; None when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        print(f"tachyon index tune: no plot: matplotlib {extras.needs('bench')}",
              file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for c in candidates:
        line = ax.plot([p.qps for p in c.points], [p.recall for p in c.points], marker="o",
                       label=f"{c.name} ({_mib(c.memory_bytes)} MiB)")[0]
        for p in c.points:
            if p.value is not None:
                ax.annotate(str(p.value), (p.qps, p.recall), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))
        if c.chosen is not None:
            ax.plot([c.chosen.qps], [c.chosen.recall], marker="o", markersize=12,
                    fillstyle="none", color=line.get_color())
    ax.axhline(target, color="#cc3311", linestyle="--", label=f"target {target}")
    ax.set_xscale("log")
    ax.set_xlabel("queries/s (in-process)")
    ax.set_ylabel("recall@k (tuning queries)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def files(info: Mapping[str, Any], candidates: Sequence[Candidate],
          chosen: Candidate | None) -> dict[str, bytes]:
    """The report's files by name: report.md, tune.json and (with matplotlib) the plot."""
    out = {
        REPORT: markdown(info, candidates, chosen).encode(),
        RAW: json.dumps(raw(info, candidates, chosen), indent=1).encode(),
    }
    image = plot(candidates, float(info["recall"]), f"{info['model']}: recall vs speed")
    if image is not None:
        out[PLOT] = image
    return out


def write(folder: Path, report: Mapping[str, bytes]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in report.items():
        (folder / name).write_bytes(content)
    return [folder / name for name in report]
