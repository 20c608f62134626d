"""`tachyon bench run | compare | list | tune`: the command line of the benchmark suite."""

from __future__ import annotations

import argparse
import contextlib
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from server.bench import report, scenario, servers, tune_cli
from server.bench.errors import BenchError
from server.bench.runner import prepare, run_points
from server.bench.scenario import Scenario

EPILOG = """\
A scenario is a TOML file (benchmarks/scenarios/*.toml; a name is looked up there); flags
override its fields, and `run` also works without one (--model and --concurrency or --rate).
Exit status: 0 measured, 1 some server could not be measured (compare), 2 bad input or an
unusable server (found before any load is sent).

examples:
  tachyon bench run identity_fp32_grpc_closed --duration 2
  tachyon bench run --url 127.0.0.1:8001 --model mlp_fp32 --concurrency 1,8,32 --procs 2
  tachyon bench run --protocol http --url 127.0.0.1:8000 --model digits --rate 200 \\
      --arrival poisson --input-data benchmarks/scenarios/digits_data.json
  tachyon bench compare identity_fp32_grpc_closed --concurrency 1,32
"""


def _numbers(kind: type[int] | type[float]) -> Any:
    def parse(text: str) -> tuple[float, ...]:
        try:
            values = tuple(kind(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected numbers like 1,2,4, got {text!r}") from None
        if not values or any(v <= 0 for v in values):
            raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
        return values

    return parse


def _shape(text: str) -> tuple[str, tuple[int, ...]]:
    name, _, dims = text.rpartition(":")
    try:
        shape = tuple(int(d) for d in dims.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected NAME:D,D,... or D,D,... (positive integers), got {text!r}") from None
    if any(d <= 0 for d in shape):
        raise argparse.ArgumentTypeError(f"dimensions must be positive, got {text!r}")
    return name, shape


def _load_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("load (override the scenario)")
    g.add_argument("--model", help="model to load")
    g.add_argument("--model-version", metavar="N", help="model version (default: the server's)")
    g.add_argument("--protocol", choices=scenario.PROTOCOLS, help="KServe v2 gRPC or HTTP")
    g.add_argument("--http-format", choices=scenario.HTTP_FORMATS,
                   help="HTTP bodies: binary tensor extension or JSON (default binary)")
    g.add_argument("--concurrency", type=_numbers(int), metavar="C,C,...",
                   help="closed loop: requests in flight, one point per value")
    g.add_argument("--rate", type=_numbers(float), metavar="R,R,...",
                   help="open loop: requests/s, one point per value")
    g.add_argument("--arrival", choices=scenario.ARRIVALS,
                   help="open loop: evenly spaced or Poisson arrivals")
    g.add_argument("--duration", type=float, metavar="S", help="measured seconds per point")
    g.add_argument("--warmup", type=float, metavar="S", help="seconds of load before each point")
    g.add_argument("--procs", type=int, metavar="N",
                   help="client processes, each with its own event loop (default 1)")
    g.add_argument("--shape", type=_shape, action="append", default=[], metavar="[NAME:]D,D",
                   help="request shape of an input (repeatable); without NAME: the only input")
    g.add_argument("--input-data", type=Path, metavar="FILE",
                   help="perf_analyzer-style JSON data file (default: random data)")
    g.add_argument("--timeout", type=float, metavar="S", help="per-request timeout")
    g.add_argument("--seed", type=int, help="seed of random data and Poisson arrivals")
    g.add_argument("--server-arg", action="append", default=None, metavar="ARG",
                   help="extra `tachyon serve` argument for a started server (repeatable)")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="report folder (default benchmarks/results/bench-<scenario>-<time>/)")
    p.add_argument("--no-progress", action="store_true", help="no live progress bar")


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`tachyon bench ...`"""
    bench = subparsers.add_parser(
        "bench", help="load-test a KServe v2 server and write a report",
        description="Load-test any KServe v2 server (gRPC or HTTP; closed loop over "
        "concurrencies or open loop at request rates) and write a report folder.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = bench.add_subparsers(dest="bench_command", required=True, metavar="COMMAND")
    run_p = commands.add_parser(
        "run", help="run a scenario (or the load the flags describe)", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run a scenario's points against --url, or against a `tachyon serve` it "
        "starts when the scenario names a repository.")
    run_p.add_argument("scenario", nargs="?", help="scenario file or name")
    target = run_p.add_argument_group("target")
    target.add_argument("--url", metavar="HOST:PORT",
                        help="a running server's gRPC or HTTP address (no server is started)")
    target.add_argument("--repository", type=Path, metavar="DIR",
                        help="start `tachyon serve` on this repository")
    _load_options(run_p)
    cmp_p = commands.add_parser(
        "compare", help="the scenario against Tachyon, MLServer and Triton (PyTriton)",
        description="Run the scenario's load against each server in turn, on the peers' "
        "models (as ../shared/bench/run-peers builds them), and write one table and one plot.")
    cmp_p.add_argument("scenario", help="scenario file or name")
    cmp_p.add_argument("--peers", nargs="+", choices=servers.PEERS, default=list(servers.PEERS),
                       help="servers to measure, in this order")
    cmp_p.add_argument("--peers-work", type=Path, default=None, metavar="DIR",
                       help="run-peers' venvs and models (default $WORK or "
                       "~/.cache/tachyon-peers)")
    cmp_p.add_argument("--peers-kit", type=Path, default=None, metavar="DIR",
                       help="the peer kit with run-peers (default ../shared/bench)")
    _load_options(cmp_p)
    commands.add_parser("list", help="list the scenarios found")
    tune_cli.add_parser(commands)


def build_scenario(args: argparse.Namespace) -> Scenario:
    """The scenario file (if any) with the flags applied, validated."""
    shapes = dict(args.shape)
    if args.scenario:
        base = scenario.load(args.scenario)
    else:
        if not args.model:
            raise BenchError("give a scenario, or --model with --concurrency or --rate")
        base = Scenario(name=args.model, model=args.model, concurrency=(1,))
        if not (args.concurrency or args.rate):
            raise BenchError("give --concurrency C,... (closed loop) or --rate R,... "
                             "(open loop)")
    changes: dict[str, Any] = {
        "model": args.model, "model_version": args.model_version, "protocol": args.protocol,
        "http_format": args.http_format, "concurrency": args.concurrency, "rate": args.rate,
        "arrival": args.arrival, "duration": args.duration, "warmup": args.warmup,
        "procs": args.procs, "timeout": args.timeout, "seed": args.seed,
        "shape": {**base.shape, **shapes} if shapes else None,
        "input_data": args.input_data.resolve() if args.input_data else None,
        "server_args": tuple(args.server_arg) if args.server_arg is not None else None,
    }
    if getattr(args, "url", None):
        changes.update(url=args.url)
    if getattr(args, "repository", None):
        changes.update(repository=args.repository.resolve())
    if args.warmup is not None and args.warmup < 0:
        raise BenchError(f"--warmup must be >= 0, got {args.warmup}")
    return base.replace(**changes)


@contextlib.contextmanager
def _server(sc: Scenario, explicit_url: bool, out: Path) -> Iterator[tuple[str, str, str]]:
    """(url, description, short name) of the server to load, starting `tachyon serve` when
    the scenario names a repository and no --url was given."""
    if sc.repository is None or explicit_url:
        yield sc.target_url, "external server", "server"
        return
    managed = servers.tachyon(sc.repository, sc.server_args, [sc.model], out / "server.log")
    print(f"tachyon bench: starting tachyon serve on {sc.repository} ...", file=sys.stderr,
          flush=True)
    with managed:
        flags = "".join(" " + shlex.quote(a) for a in sc.server_args)
        yield (managed.url(sc.protocol), f"tachyon serve (started: {sc.repository}{flags})",
               "tachyon")


def _run(args: argparse.Namespace) -> int:
    sc = build_scenario(args)
    out = args.out or report.default_out(sc.name)
    with _server(sc, bool(args.url), out) as (url, server, name):
        control, target = prepare(sc, url)
        try:
            print(f"tachyon bench: {sc.name}: {sc.model} at {url} ({sc.protocol}), "
                  f"{len(sc.points)} point(s), data: {target.data_source}", file=sys.stderr,
                  flush=True)
            results = run_points(target, control, not args.no_progress)
        finally:
            control.close()
        info = report.describe(target, server, name)
    written = report.write(out, info, results)
    print(report.table(results))
    print(f"wrote {', '.join(str(p) for p in written)}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from server.bench.compare import compare

    sc = build_scenario(args)
    out = args.out or report.default_out(f"compare-{sc.name}")
    return compare(sc, args.peers, args.peers_work or servers.default_work(),
                   args.peers_kit or servers.default_kit(), out, not args.no_progress)


def _list() -> int:
    seen = set()
    for folder in scenario.search_dirs():
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.suffix not in scenario.SUFFIXES or path.stem in seen:
                continue
            seen.add(path.stem)
            try:
                description = scenario.load(str(path)).description
            except BenchError as exc:
                description = f"(invalid: {exc})"
            print(f"{path.stem:32} {description}  [{path}]")
    return 0


def run(args: argparse.Namespace) -> int:
    """Runs `tachyon bench <command>`; 0 measured, 1 a peer not measured (tune: no config met
    the budget), 2 bad input."""
    try:
        if args.bench_command == "run":
            return _run(args)
        if args.bench_command == "compare":
            return _compare(args)
        if args.bench_command == "tune":
            return tune_cli.run(args)
        return _list()
    except BenchError as exc:
        print(f"tachyon bench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tachyon bench: interrupted", file=sys.stderr)
        return 130
