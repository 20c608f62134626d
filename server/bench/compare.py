"""`tachyon bench compare SCENARIO`: the scenario's load against Tachyon and its peers, one
server at a time, on the peers' models (mlp_fp32, identity_fp32 as run-peers builds them), then
one table and one plot comparing them; each server's full report goes into a subfolder."""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from server.bench import report, servers
from server.bench.errors import BenchError
from server.bench.results import PointResult
from server.bench.runner import prepare, run_points
from server.bench.scenario import Scenario

LABELS = {"tachyon": "Tachyon", "mlserver": "MLServer", "triton": "Triton (PyTriton)"}


def _launch(peer: str, scenario: Scenario, work: Path, kit: Path, tmp: Path,
            out: Path) -> servers.ManagedServer:
    log = out / peer / "server.log"
    if peer == "tachyon":
        repo = servers.peer_repository(work, kit, tmp / "repo")
        return servers.tachyon(repo, scenario.server_args, [scenario.model], log)
    if peer == "mlserver":
        return servers.mlserver(work, kit, tmp / "mls", log)
    return servers.triton(work, kit, log)


def compare_table(series: Mapping[str, Sequence[PointResult]],
                  failures: Mapping[str, str]) -> str:
    """One row per point, one column per server: infer/s and p50 / p99 latency."""
    names = list(series)
    labels = list(dict.fromkeys(r.point.label for results in series.values() for r in results))
    head = ["point", *(f"{LABELS.get(n, n)}: infer/s (p50 / p99 ms, errors)" for n in names)]
    rows = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for label in labels:
        cells = [label]
        for name in names:
            r = next((x for x in series[name] if x.point.label == label), None)
            cells.append("-" if r is None else
                         f"{r.throughput:,.0f} ({r.latency_ms(50):.2f} / {r.latency_ms(99):.2f}"
                         f"{', ' + str(r.error_count) + ' err' if r.error_count else ''})")
        rows.append("| " + " | ".join(cells) + " |")
    lines = [*rows, ""]
    best = {n: max(rs, key=lambda r: r.throughput) for n, rs in series.items() if rs}
    if "tachyon" in best:
        ours = best["tachyon"]
        for name, theirs in best.items():
            if name != "tachyon" and theirs.throughput > 0:
                lines.append(
                    f"- best throughput, Tachyon / {LABELS.get(name, name)}: "
                    f"{ours.throughput:,.0f} / {theirs.throughput:,.0f} = "
                    f"{ours.throughput / theirs.throughput:.2f}x (p99 at those points: "
                    f"{ours.latency_ms(99):.2f} vs {theirs.latency_ms(99):.2f} ms)")
    for name, message in failures.items():
        lines.append(f"- {LABELS.get(name, name)} was not measured: {message}")
    return "\n".join(lines) + "\n"


def compare(scenario: Scenario, peers: Sequence[str], work: Path, kit: Path, out: Path,
            progress: bool) -> int:
    if scenario.model not in servers.PEER_MODELS:
        raise BenchError(f"compare runs on the peers' models ({', '.join(servers.PEER_MODELS)});"
                         f" scenario {scenario.name} loads '{scenario.model}'")
    for model in servers.PEER_MODELS:
        servers.peer_model_file(work, kit, model)
    series: dict[str, list[PointResult]] = {}
    failures: dict[str, str] = {}
    out.mkdir(parents=True, exist_ok=True)
    for peer in peers:
        label = LABELS.get(peer, peer)
        print(f"tachyon bench compare: {label} ...", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(prefix=f"tachyon-bench-{peer}-") as tmp:
            try:
                with _launch(peer, scenario, work, kit, Path(tmp), out) as server:
                    url = server.url(scenario.protocol)
                    control, target = prepare(scenario, url,
                                              servers.peer_model_info(scenario.model),
                                              server.headers[scenario.protocol])
                    try:
                        results = run_points(target, control, progress, f"{label}")
                    finally:
                        control.close()
                    info = report.describe(target, f"{label} (started)", label)
                    report.write(out / peer, info, results)
                    series[peer] = results
            except BenchError as exc:
                failures[peer] = str(exc).splitlines()[0]
                print(f"tachyon bench compare: {label}: {exc}", file=sys.stderr)
    text = compare_table(series, failures)
    mode = "closed loop" if scenario.mode == "closed" else f"open loop ({scenario.arrival})"
    header = (f"# tachyon bench compare: {scenario.name}\n\n"
              f"- command: `{report.command_line()}`\n- machine: {report.machine()}\n"
              f"- model {scenario.model}, {scenario.protocol}, {mode}, "
              f"{scenario.warmup:g} s warmup + {scenario.duration:g} s per point, "
              f"{scenario.procs} client process(es); servers measured one at a time\n\n")
    (out / report.COMPARE_MD).write_text(header + text)
    (out / report.COMPARE_JSON).write_text(json.dumps({
        "scenario": scenario.describe(), "command": report.command_line(),
        "machine": report.machine(), "failures": failures,
        "servers": {name: [r.summary() for r in rs] for name, rs in series.items()},
    }, indent=1))
    report.plot_curve(out / report.COMPARE_PNG,
                      {LABELS.get(n, n): rs for n, rs in series.items()},
                      f"{scenario.name}: throughput vs latency")
    print(text)
    print(f"wrote {out / report.COMPARE_MD}")
    return 0 if series and not failures else 1
