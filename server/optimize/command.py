"""`tachyon optimize`: write the next version of an ONNX model, optimised, with a report.

    tachyon optimize --repository R --model M --to fp16|int8-dynamic|int8-static
        [--calibration DATA] [--validation DATA] [--from-version N] [--version N]
        [--update-policy] [--labels-key KEY] [--label-output NAME] [--timing-runs N]

reads the model's latest version (or --from-version), converts it (targets.py), measures it
against its source (measure.py) and publishes `R/M/<next>/` with the model file and
report.md / report.png / report.json. A server in poll mode picks the new version up at its
next scan; in explicit mode a load request does (POST /v2/repository/models/M/load).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from server.optimize import data, measure, report, targets, versions
from server.optimize.errors import OptimizeError

DEFAULT_TIMING_RUNS = 200
THREADS_PARAMETER = "intra_op_thread_count"


@dataclass(frozen=True, slots=True)
class Request:
    repository: Path
    model: str
    target: str
    calibration: Path | None = None
    validation: Path | None = None
    from_version: int | None = None
    version: int | None = None
    update_policy: bool = False
    labels_key: str = data.LABELS_KEY
    label_output: str | None = None
    timing_runs: int = DEFAULT_TIMING_RUNS
    command: str = ""


@dataclass(frozen=True, slots=True)
class Result:
    version: int
    version_dir: Path
    report: report.Report
    policy: versions.PolicyCheck
    config_updated: Path | None
    warnings: tuple[str, ...]


def optimize(request: Request) -> Result:
    """The whole run. Everything is checked before anything is written; a failure leaves the
    repository as it was."""
    target = targets.TARGETS.get(request.target)
    if target is None:
        raise OptimizeError(
            f"--to '{request.target}' is not supported, expected one of "
            f"{', '.join(targets.TARGETS)}"
        )
    if request.timing_runs < 1:
        raise OptimizeError(f"--timing-runs {request.timing_runs} is invalid, expected >= 1")
    if target.needs_calibration and request.calibration is None:
        raise OptimizeError(
            f"--to {target.name} needs --calibration DATA (a .npz of representative inputs, "
            "keyed by input name) to fix the activation scales; or use --to int8-dynamic, "
            "which needs none"
        )
    source = versions.find_source(request.repository, request.model, request.from_version)
    number = versions.next_version(source.model_dir, request.version)
    layouts = data.layouts(source.spec)
    if request.labels_key in {layout.name for layout in layouts}:
        raise OptimizeError(
            f"--labels-key '{request.labels_key}' is also an input of model '{request.model}', "
            "expected another key for the labels"
        )
    calibration, rows, notes = _data(request, target, layouts)
    made_by = versions.made_by_optimize(source)
    if made_by:
        notes.append(
            f"the source, version {source.version}, is itself {made_by}; pass --from-version to "
            "optimise another version"
        )
    staging = versions.staging_dir(request.repository, request.model)
    try:
        built = _build(request, target, source, staging, calibration, rows, number)
        warnings = notes + report.write(built, staging)
        version_dir = versions.publish(staging, source.model_dir, number)
    finally:
        versions.discard(staging)  # gone already after a publish
    return _finish(request, source, number, version_dir, built, warnings)


def _data(
    request: Request, target: targets.Target, layouts: tuple[data.InputLayout, ...]
) -> tuple[data.DataSet | None, data.DataSet, list[str]]:
    """The calibration rows (when the target uses them), the rows to compare on, and notes."""
    calibration = None
    notes = []
    if request.calibration is not None and target.needs_calibration:
        calibration = data.load(request.calibration, layouts, "--calibration", None)
    elif request.calibration is not None:
        notes.append(f"--calibration is not used by --to {target.name}; ignored")
    if request.validation is not None:
        rows = data.load(request.validation, layouts, "--validation", request.labels_key)
    else:
        rows = data.generate(layouts)
    return calibration, rows, notes


def _build(
    request: Request,
    target: targets.Target,
    source: versions.Source,
    staging: Path,
    calibration: data.DataSet | None,
    rows: data.DataSet,
    number: int,
) -> report.Report:
    filename = target.filename or source.model_file.name
    output = staging / filename
    with tempfile.TemporaryDirectory(prefix="tachyon-optimize-") as scratch:
        job = targets.ConvertJob(
            source.model_file, output, Path(scratch), calibration, source.spec.max_batch_size
        )
        steps = targets.convert(target, job)
    threads = source.spec.parameters.get(THREADS_PARAMETER, "")
    comparison = measure.compare(
        (source.model_file, output), rows, source.spec.max_batch_size,
        request.label_output, request.timing_runs, int(threads) if threads.isdigit() else 1,
        target.providers,
    )
    return report.Report(
        request.model, source.version, number, target.name, tuple(steps), rows.origin,
        request.validation is None, request.command, comparison,
    )


def _finish(
    request: Request,
    source: versions.Source,
    number: int,
    version_dir: Path,
    built: report.Report,
    warnings: list[str],
) -> Result:
    policy = versions.check_policy(source, number)
    updated = None
    if not policy.serves_new and request.update_policy:
        updated = versions.add_to_policy(source, number)
        policy = versions.check_policy(versions.find_source(
            request.repository, request.model, source.version), number)
    return Result(number, version_dir, built, policy, updated, tuple(warnings))


# -- command line ---------------------------------------------------------------------------


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`tachyon optimize ...`"""
    choices = ", ".join(f"{t.name} ({t.summary})" for t in targets.TARGETS.values())
    p = subparsers.add_parser(
        "optimize",
        help="write the next version of an ONNX model, optimised (fp16, int8), with a report",
        description="Convert a model's latest version with ONNX Runtime's tools and write it "
        "as the next version, with report.md / report.png comparing it with its source: "
        "accuracy (labelled --validation data) or output agreement, latency at batch 1, "
        "throughput at batch 32, size on disk. A server in poll mode picks the new version "
        "up; in explicit mode, send a load request.",
    )
    p.add_argument("--repository", "--model-repository", type=Path, required=True,
                   metavar="DIR", help="the model repository (Triton layout)")
    p.add_argument("--model", required=True, metavar="NAME", help="the model to optimise")
    p.add_argument("--to", dest="target", required=True, choices=tuple(targets.TARGETS),
                   metavar="TARGET", help=f"what to make: {choices}")
    p.add_argument("--calibration", type=Path, metavar="DATA",
                   help="int8-static: representative inputs, a .npz keyed by input name "
                   "([N, *dims] each) or a .npy for a one-input model")
    p.add_argument("--validation", type=Path, metavar="DATA",
                   help="held-out inputs to compare the versions on (same format), with the "
                   "true classes under --labels-key for accuracy (default: rows generated from "
                   "the input specs; agreement only)")
    p.add_argument("--labels-key", default=data.LABELS_KEY, metavar="KEY",
                   help="the --validation array holding integer class labels [N] "
                   "(default: %(default)s)")
    p.add_argument("--label-output", metavar="NAME",
                   help="the output that predicts the class (default: the first integer output "
                   "with one value per row, else the first float output's argmax)")
    p.add_argument("--from-version", type=int, metavar="N",
                   help="the version to optimise (default: the latest)")
    p.add_argument("--version", type=int, metavar="N",
                   help="the version to write (default: one after the highest); never an "
                   "existing one")
    p.add_argument("--update-policy", action="store_true",
                   help="add the new version to a 'specific' version_policy in config.pbtxt "
                   "(without it the config is left unchanged)")
    p.add_argument("--timing-runs", type=int, default=DEFAULT_TIMING_RUNS, metavar="N",
                   help="timed runs per model and batch size (default: %(default)s)")


def run(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    """Run `tachyon optimize`; 0 on success, 2 on bad input, 1 on a failed conversion."""
    shown = argv if argv is not None else sys.argv[1:]
    request = Request(
        repository=args.repository,
        model=args.model,
        target=args.target,
        calibration=args.calibration,
        validation=args.validation,
        from_version=args.from_version,
        version=args.version,
        update_policy=args.update_policy,
        labels_key=args.labels_key,
        label_output=args.label_output,
        timing_runs=args.timing_runs,
        command=shlex.join(["tachyon", *shown]),
    )
    try:
        result = optimize(request)
    except OptimizeError as exc:
        print(f"tachyon optimize: error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    _print_result(request, result)
    return 0


def _print_result(request: Request, result: Result) -> None:
    built = result.report
    c = built.comparison
    folder = result.version_dir
    print(f"model '{request.model}' version {result.version} ({built.target} of version "
          f"{built.source_version}) written to {folder}/")
    print(f"  size {c.sizes[0]:,} -> {c.sizes[1]:,} bytes ({c.sizes[1] / c.sizes[0]:.2f}x)")
    if c.accuracy is not None:
        print(f"  accuracy {c.accuracy[0]:.2%} -> {c.accuracy[1]:.2%} on {c.rows:,} rows")
    for a in c.agreement:
        print(f"  {a.output}: {a.agree:.2%} of rows agree ({a.rule})")
    print(f"  latency batch {c.latency[0].batch}: {report.speedup(c.latency):.2f}x, "
          f"throughput batch {c.throughput[0].batch}: {report.speedup(c.throughput):.2f}x "
          "(source time / new time)")
    print(f"  report: {folder}/{report.MARKDOWN}")
    for warning in result.warnings:
        print(f"tachyon optimize: warning: {warning}", file=sys.stderr)
    _print_serving(request, result)


def _print_serving(request: Request, result: Result) -> None:
    policy = result.policy
    if result.config_updated is not None:
        print(f"  added version {result.version} to the version_policy in "
              f"{result.config_updated}")
    if not policy.serves_new:
        print(f"note: the version_policy {policy.policy} does not serve version "
              f"{result.version}; config.pbtxt is unchanged (pass --update-policy to add it, or "
              "edit the policy)")
        return
    print(f"  a server serves versions {policy.served} of '{request.model}' under its "
          f"version_policy {policy.policy}: poll mode picks version {result.version} up at the "
          "next scan; explicit mode after a load request (POST "
          f"/v2/repository/models/{request.model}/load); mode none after a restart")
