"""`tachyon bench tune`: flags, the search with a progress bar, the best config written."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import text_format

from server import model_config, model_versions
from server.bench import report, tune, tune_report
from server.bench.errors import BenchError
from server.bench.tune import Load, Space, Trial, TrialConfig

SEARCHES = ("quick", "brute")


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 1,8,32, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one integer, got {text!r}")
    return values


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`tachyon bench tune ...`"""
    d = Space()
    p = commands.add_parser(
        "tune", help="find the config with the best throughput under a p99 budget",
        description="Search max_batch_size, max_queue_delay_microseconds, instance count and "
        "intra-op threads of a model, measuring each config on a `tachyon serve` over a "
        "scratch copy of the model, and write the best one whose p99 meets --p99-ms. Exit "
        "status: 0 written, 1 no config met the budget (report written, no config), 2 bad "
        "input.")
    p.add_argument("--repository", type=Path, required=True, metavar="DIR",
                   help="the model repository (read; the best config is written here at the "
                   "end unless --output)")
    p.add_argument("--model", required=True, metavar="NAME", help="the model to tune")
    p.add_argument("--p99-ms", type=float, required=True, metavar="MS",
                   help="latency budget: a config's p99 must not exceed it")
    p.add_argument("--concurrency", type=int, default=8, metavar="C",
                   help="requests in flight while measuring (default 8)")
    p.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    p.add_argument("--max-batch-size", type=_ints, default=d.max_batch_size, metavar="N,N",
                   help="max_batch_size values (default 1,8,32,64)")
    p.add_argument("--max-queue-delay-us", type=_ints, default=d.delay_us, metavar="US,US",
                   help="dynamic_batching max_queue_delay_microseconds values (default "
                   "0,500,2000)")
    p.add_argument("--instances", type=_ints, default=d.instances, metavar="N,N",
                   help="instance_group count values (default 1,2)")
    p.add_argument("--threads", type=_ints, default=(1, 2), metavar="N,N",
                   help="intra-op threads per instance (ONNX Runtime intra_op_thread_count, "
                   "FAISS omp_threads; default 1,2)")
    p.add_argument("--search", choices=SEARCHES, default="quick",
                   help="quick: hill climbing from the smallest settings (Model Analyzer's quick "
                   "search); brute: every combination (default quick)")
    p.add_argument("--max-trials", type=int, default=24, metavar="N",
                   help="stop after this many trials (default 24)")
    p.add_argument("--duration-s", type=float, default=3.0, metavar="S",
                   help="measured seconds per trial (default 3)")
    p.add_argument("--warmup-s", type=float, default=1.0, metavar="S",
                   help="seconds of load before each measurement (default 1)")
    p.add_argument("--shape", action="append", default=[], metavar="NAME:D,D",
                   help="request shape of an input (repeatable), as `tachyon bench run`")
    p.add_argument("--input-data", type=Path, default=None, metavar="FILE",
                   help="perf_analyzer-style JSON data (default: random)")
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="extra `tachyon serve` argument (repeatable)")
    p.add_argument("--output", type=Path, default=None, metavar="FILE",
                   help="write the best config.pbtxt here and leave the repository alone "
                   "(default: the model's next version in the repository)")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="report folder (default benchmarks/results/bench-tune-<model>-<time>/)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


@dataclass(frozen=True, slots=True)
class Request:
    """The checked flags."""

    model_dir: Path
    budget_ms: float
    space: Space
    load: Load
    search: str
    max_trials: int


def _check(args: argparse.Namespace, model_dir: Path, backend: str) -> Request:
    for flag, values, low in (("--max-batch-size", args.max_batch_size, 1),
                              ("--max-queue-delay-us", args.max_queue_delay_us, 0),
                              ("--instances", args.instances, 1), ("--threads", args.threads, 1)):
        bad = [v for v in values if v < low]
        if bad:
            raise BenchError(f"{flag} {bad[0]} is invalid, expected integers >= {low}")
    if not args.p99_ms > 0:
        raise BenchError(f"--p99-ms {args.p99_ms} is invalid, expected a positive number")
    if not args.duration_s >= 0.1:
        raise BenchError(f"--duration-s {args.duration_s} is invalid, expected at least 0.1")
    for flag, number in (("--concurrency", args.concurrency), ("--max-trials", args.max_trials)):
        if number < 1:
            raise BenchError(f"{flag} {number} is invalid, expected a positive integer")
    if args.input_data is not None and not args.input_data.is_file():
        raise BenchError(f"--input-data {args.input_data} does not exist")
    if args.warmup_s < 0:
        raise BenchError(f"--warmup-s {args.warmup_s} is invalid, expected >= 0")
    shapes = []
    for text in args.shape:
        name, _, dims = text.rpartition(":")
        try:
            shapes.append((name, tuple(int(d) for d in dims.split(","))))
        except ValueError:
            raise BenchError(f"--shape {text!r} is invalid, expected NAME:D,D,...") from None
    space = Space(tuple(sorted(set(args.max_batch_size))),
                  tuple(sorted(set(args.max_queue_delay_us))),
                  tuple(sorted(set(args.instances))),
                  tune.threads_axis(backend, tuple(sorted(set(args.threads)))))
    load = Load(args.concurrency, args.duration_s, args.warmup_s, args.protocol, tuple(shapes),
                args.input_data.resolve() if args.input_data else None)
    return Request(model_dir, args.p99_ms, space, load, args.search,
                   args.max_trials)


def _model_dir(repository: Path, model: str) -> Path:
    if not repository.is_dir():
        raise BenchError(f"--repository {repository} is not a directory")
    model_dir = repository / model
    if not model or "/" in model or model.startswith(".") or not model_dir.is_dir():
        known = sorted(p.name for p in repository.iterdir()
                       if p.is_dir() and not p.name.startswith((".", "_")))
        raise BenchError(f"--model '{model}' is not in repository {repository}, expected one "
                         f"of: {', '.join(known) or '(none)'}")
    return model_dir.resolve()


def search(request: Request, base: Any, backend: str, out: Path,
           server_args: list[str], progress: bool) -> list[Trial]:
    """Runs the trials with a progress bar naming the current config and the best so far."""
    from tqdm import tqdm

    total = min(request.max_trials, request.space.size()) + 1  # + the model's own config
    bar = tqdm(total=total, unit="trial", desc="tune", file=sys.stderr, dynamic_ncols=True,
               disable=None if progress else True)
    done: list[Trial] = []
    with tune.TrialRunner(request.model_dir, base, backend, request.load, server_args,
                          out) as runner:

        def measure(config: TrialConfig) -> Trial:
            bar.set_description_str(f"tune {config.label}")
            trial = runner.measure(config)
            done.append(trial)
            top = tune.best(done, request.budget_ms)
            bar.set_postfix_str(f"best {top.config.label} {top.throughput:,.0f}/s" if top
                                else "none within budget yet")
            bar.update(1)
            return trial

        bar.set_description_str("tune: the model's own config")
        done.append(dataclasses.replace(
            runner.measure(tune.current(base, backend), as_is=True), baseline=True))
        bar.update(1)
        try:
            if request.search == "brute":
                tune.brute(request.space, measure, request.max_trials)
            else:
                tune.quick(request.space, measure, request.max_trials, request.budget_ms)
        finally:
            bar.close()
    return done


def _space_text(space: Space) -> str:
    threads = ",".join("-" if t is None else str(t) for t in space.threads)
    return (f"max_batch_size {{{','.join(map(str, space.max_batch_size))}}} x delay_us "
            f"{{{','.join(map(str, space.delay_us))}}} x instances "
            f"{{{','.join(map(str, space.instances))}}} x threads {{{threads}}}")


def run(args: argparse.Namespace) -> int:
    """0: the best config written; 1: none met the budget; BenchError (2) on bad input."""
    model_dir = _model_dir(args.repository, args.model)
    base, backend = tune.base_config(model_dir)
    request = _check(args, model_dir, backend)
    out = args.out or report.default_out(f"tune-{args.model}")
    print(f"tachyon bench tune: {args.model} ({backend}), {request.search} search over "
          f"{_space_text(request.space)}, p99 <= {args.p99_ms:g} ms at concurrency "
          f"{args.concurrency}", file=sys.stderr, flush=True)
    trials = search(request, base, backend, out, args.server_arg, not args.no_progress)
    chosen = tune.best(trials, request.budget_ms)
    config_text = None
    written = "nothing"
    if chosen is not None and chosen.baseline and args.output is None:
        written = "nothing (the model's own config is the best found)"
    elif chosen is not None:  # --output gets the best config even when it is the model's own
        config_text = text_format.MessageToString(tune.candidate(base, backend, chosen.config))
        written = _write_best(model_dir, config_text, args.output)
    info = _info(args, request, model_dir, written)
    files = tune_report.write(out, info, trials, chosen, config_text)
    print(tune_report.table(trials, request.budget_ms, chosen))
    print(f"wrote {', '.join(str(p) for p in files)}")
    if chosen is None:
        measured = [t for t in trials if not t.failure and t.errors == 0]
        lowest = min(measured, key=lambda t: t.p99_ms, default=None)
        closest = (f"the lowest p99 was {lowest.p99_ms:.2f} ms ({lowest.config.label})"
                   if lowest else "no trial ran without errors")
        print(f"tachyon bench tune: no config met p99 <= {args.p99_ms:g} ms at concurrency "
              f"{args.concurrency}: {closest}; no config written (raise --p99-ms or lower "
              "--concurrency)", file=sys.stderr)
        return 1
    print(f"best: {chosen.config.label}: {chosen.throughput:,.1f} infer/s, p99 "
          f"{chosen.p99_ms:.2f} ms{tune_report.versus_baseline(trials, chosen)} -> {written}")
    return 0


def _write_best(model_dir: Path, config_text: str, output: Path | None) -> str:
    """--output: that file only. Otherwise the model's next version: a copy of the latest
    version's files with the tuned config, which a polling server loads as a new version."""
    if output is not None:
        path = output / "config.pbtxt" if output.is_dir() else output
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(config_text)
        return str(path)
    latest = model_dir / str(model_versions.versions(model_dir)[-1])
    files = {child.name: child for child in latest.iterdir()}
    published = model_versions.publish(model_dir, files, config_text)
    note = model_versions.policy_note(model_config.read_config(model_dir), published)
    if note:
        print(f"tachyon bench tune: {note}", file=sys.stderr)
    return f"{published.version_dir} and {published.config_path}"


def _info(args: argparse.Namespace, request: Request, model_dir: Path,
          written: str) -> dict[str, Any]:
    load = request.load
    data = str(load.input_data) if load.input_data else "random tensors from the metadata"
    return {
        "model": args.model, "model_dir": str(model_dir), "command": report.command_line(),
        "machine": report.machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "p99_ms": request.budget_ms, "concurrency": load.concurrency,
        "protocol": load.protocol, "duration_s": load.duration_s, "warmup_s": load.warmup_s,
        "data": data, "search": request.search, "space": _space_text(request.space),
        "written": written,
    }
