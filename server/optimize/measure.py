"""Source and optimised model side by side: output agreement, accuracy, latency at batch 1,
throughput at batch 32, size on disk.

Both models run in this one process with the same session options, on the same rows; timed
runs alternate between them (source first on even runs, target first on odd ones), so drift in
the machine's load reaches both alike.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from server.optimize.data import DataSet
from server.optimize.errors import FAILED, OptimizeError
from server.types import Array

LATENCY_BATCH = 1
THROUGHPUT_BATCH = 32
EVAL_BATCH = 64
WARMUP_RUNS = 3
FLOAT_RTOL, FLOAT_ATOL = 1e-2, 1e-3  # "agree" for a float output without a class axis


@dataclass(frozen=True, slots=True)
class Timing:
    """Seconds per run of one model at one batch size."""

    batch: int
    median_s: float
    p90_s: float
    runs: int

    @property
    def rows_per_s(self) -> float:
        return self.batch / self.median_s if self.median_s > 0 else float("inf")


@dataclass(frozen=True, slots=True)
class Agreement:
    """How one output of the target compares with the source's on the same rows."""

    output: str
    kind: str  # the numpy dtype kind of the output: "f" float, "i" / "u" integer, "b" bool
    rule: str  # what "agree" means for this output
    agree: float  # fraction of rows that agree
    max_abs_diff: float
    mean_abs_diff: float


@dataclass(frozen=True, slots=True)
class Comparison:
    rows: int
    agreement: tuple[Agreement, ...]
    accuracy: tuple[float, float] | None  # (source, target) when the data has labels
    label_output: str | None
    latency: tuple[Timing, Timing]  # batch 1: (source, target)
    throughput: tuple[Timing, Timing]  # batch 32 (or max_batch_size, if smaller)
    sizes: tuple[int, int]  # bytes on disk
    threads: int
    providers: tuple[str, ...]


def session(path: Path, threads: int, providers: tuple[str, ...]) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=list(providers))
    except Exception as exc:  # ONNX Runtime raises its own exception types
        raise OptimizeError(
            f"ONNX Runtime cannot load {path} on {', '.join(providers)}: {exc}", FAILED
        ) from exc


def check_signature(source: Any, target: Any) -> None:
    """The target must take and give what the source does (the config is shared)."""
    for kind in ("inputs", "outputs"):
        want = {t.name: (t.type, len(t.shape)) for t in getattr(source, f"get_{kind}")()}
        got = {t.name: (t.type, len(t.shape)) for t in getattr(target, f"get_{kind}")()}
        for name, (dtype, rank) in want.items():
            if got.get(name) != (dtype, rank):
                found = got.get(name, "missing")
                raise OptimizeError(
                    f"the optimised model's {kind[:-1]} '{name}' is {found}, expected "
                    f"{(dtype, rank)} as in the source (type, rank)",
                    FAILED,
                )


def compare(
    paths: tuple[Path, Path],
    data: DataSet,
    max_batch_size: int,
    label_output: str | None,
    timing_runs: int,
    threads: int,
    providers: tuple[str, ...],
) -> Comparison:
    """Run both models on `data` and time them; `paths` is (source, target)."""
    source, target = (session(p, threads, providers) for p in paths)
    check_signature(source, target)
    outputs = [o.name for o in source.get_outputs()]
    if label_output is not None and label_output not in outputs:
        raise OptimizeError(
            f"--label-output '{label_output}' is not an output of the model, expected one of "
            f"{outputs}"
        )
    limit = max_batch_size or EVAL_BATCH
    ours = _run_all(source, data, outputs, min(limit, EVAL_BATCH))
    theirs = _run_all(target, data, outputs, min(limit, EVAL_BATCH))
    agreement = tuple(_agreement(n, ours[n], theirs[n]) for n in outputs)
    accuracy = None
    if data.labels is not None:
        label_output = label_output or _label_output(outputs, ours)
        accuracy = (
            _accuracy(ours[label_output], data.labels),
            _accuracy(theirs[label_output], data.labels),
        )
    batch = min(limit, THROUGHPUT_BATCH)
    latency = _time_pair(source, target, data, LATENCY_BATCH, timing_runs)
    throughput = _time_pair(source, target, data, batch, timing_runs)
    sizes = (paths[0].stat().st_size, paths[1].stat().st_size)
    return Comparison(
        data.rows, agreement, accuracy, label_output if accuracy else None, latency,
        throughput, sizes, threads, providers,
    )


def _run_all(sess: Any, data: DataSet, outputs: list[str], batch: int) -> dict[str, Array]:
    parts: dict[str, list[Array]] = {name: [] for name in outputs}
    for start in range(0, data.rows, batch):
        feed = data.take(start, min(start + batch, data.rows))
        for name, array in zip(outputs, sess.run(outputs, feed), strict=True):
            parts[name].append(np.asarray(array))
    return {name: np.concatenate(chunks) for name, chunks in parts.items()}


def _agreement(name: str, want: Array, got: Array) -> Agreement:
    rows = want.shape[0]
    flat_want = want.reshape(rows, -1)
    flat_got = got.reshape(rows, -1)
    diff = np.abs(flat_want.astype(np.float64) - flat_got.astype(np.float64))
    if want.dtype.kind == "f" and flat_want.shape[1] > 1:
        rule = "same argmax (top-1 class)"
        same = flat_want.argmax(axis=1) == flat_got.argmax(axis=1)
    elif want.dtype.kind == "f":
        rule = f"within rtol {FLOAT_RTOL:g}, atol {FLOAT_ATOL:g}"
        same = np.isclose(flat_got, flat_want, rtol=FLOAT_RTOL, atol=FLOAT_ATOL).all(axis=1)
    else:
        rule = "equal"
        same = (flat_want == flat_got).all(axis=1)
    return Agreement(
        name,
        want.dtype.kind,
        rule,
        float(same.mean()),
        float(diff.max(initial=0.0)),
        float(diff.mean()),
    )


def _label_output(outputs: list[str], results: dict[str, Array]) -> str:
    """The output that predicts the class: the first integer output with one value per row,
    else the first float output with a class axis (its argmax)."""
    for name in outputs:
        array = results[name]
        if array.dtype.kind in "iu" and array.reshape(array.shape[0], -1).shape[1] == 1:
            return name
    for name in outputs:
        array = results[name]
        if array.dtype.kind == "f" and array.reshape(array.shape[0], -1).shape[1] > 1:
            return name
    raise OptimizeError(
        f"the data has labels, but no output of {outputs} predicts a class (an integer per row, "
        "or float scores per class); pass --label-output NAME or leave the labels out"
    )


def _accuracy(predicted: Array, labels: Array) -> float:
    rows = predicted.shape[0]
    flat = predicted.reshape(rows, -1)
    classes = flat[:, 0] if flat.shape[1] == 1 else flat.argmax(axis=1)
    return float((classes.astype(np.int64) == labels).mean())


def _time_pair(
    source: Any, target: Any, data: DataSet, batch: int, runs: int
) -> tuple[Timing, Timing]:
    feeds = [data.take(i * batch, (i + 1) * batch) for i in range(min(runs, 16))]
    for feed in feeds[:WARMUP_RUNS]:
        source.run(None, feed)
        target.run(None, feed)
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(runs):
        feed = feeds[i % len(feeds)]
        order = (0, 1) if i % 2 == 0 else (1, 0)
        for which in order:
            sess = (source, target)[which]
            started = time.perf_counter()
            sess.run(None, feed)
            times[which].append(time.perf_counter() - started)
    source_timing, target_timing = (_timing(batch, t) for t in times)
    return source_timing, target_timing


def _timing(batch: int, seconds: list[float]) -> Timing:
    ordered = sorted(seconds)
    p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
    return Timing(batch, statistics.median(ordered), p90, len(ordered))
