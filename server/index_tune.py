"""`tachyon index tune`: choose nprobe / efSearch (and, with --factories, the index itself) for a
recall target, measured against exact search, and write them as a new model version.

    tachyon index tune --repository REPO --model NAME --queries Q.npy --recall 0.95
        [--holdout H.npy] [--k 10] [--vectors V.npy [--ids I.npy]]
        [--factories "IVF1024,Flat;IVF1024,PQ32;IVF1024,SQ8"] [--optimize qps|memory]
        [--train-size N] [--batch 32] [--threads N] [--sigmas 2] [--measure-s 0.25]
        [--from-version N]

The served index (the latest version unless --from-version) is swept on half of the queries
(the tuning half; --holdout gives a separate held-out set instead), its smallest setting that
meets the recall is checked on the held-out half, and the result is written as the next version:
the index with its new setting stored in it, config.pbtxt `parameters` updated (how the faiss
backend reads nprobe / efSearch), and report.md, tune.json and recall_qps.png beside the index.
Exact neighbours come from the index's own vectors when it stores them exactly (Flat, IVF-Flat,
HNSW-Flat), else from --vectors. If no candidate meets the recall nothing is written (exit 1).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import text_format

from server import index_build, index_sweep, model_config, model_versions
from server import index_tune_report as report
from server.backends.faiss import DEFAULT_K, index_kind, read_index
from server.index_sweep import Candidate, TuneError
from server.model_config import ConfigError
from server.types import Array

OPTIMIZE = ("qps", "memory")


@dataclass(frozen=True, slots=True)
class TuneOptions:
    recall: float
    k: int | None = None  # default: the config's parameters.k
    factories: tuple[str, ...] = ()
    optimize: str = "qps"
    batch: int = 32
    threads: int | None = None  # default: the config's omp_threads, else half the cores
    sigmas: float = 2.0
    seed: int = 0
    measure_s: float = index_sweep.MEASURE_S  # seconds of searching per measured point
    train_size: int | None = None  # vectors each --factories index trains on (None: as build)


@dataclass(slots=True)
class Source:
    """The model as the repository holds it."""

    model_dir: Path
    config: Any  # ModelConfig or None
    version: int
    index: Any
    filename: str


@dataclass(slots=True)
class TuneResult:
    candidates: list[Candidate]
    chosen: Candidate | None
    info: dict[str, Any]
    report: dict[str, bytes] = field(default_factory=dict)
    published: model_versions.Published | None = None
    failure: str = ""  # why nothing was written


def check_options(options: TuneOptions) -> None:
    if not 0 < options.recall <= 1:
        raise TuneError(f"--recall {options.recall} is out of range, expected 0 < recall <= 1")
    for flag, value in (("--k", options.k), ("--batch", options.batch),
                        ("--threads", options.threads)):
        if value is not None and value < 1:
            raise TuneError(f"{flag} {value} is invalid, expected a positive integer")
    if options.optimize not in OPTIMIZE:
        raise TuneError(f"--optimize '{options.optimize}' is unknown, expected qps or memory")
    if options.sigmas < 0:
        raise TuneError(f"--sigmas {options.sigmas} is invalid, expected >= 0")
    if not options.measure_s > 0:
        raise TuneError(f"--measure-s {options.measure_s} is invalid, expected > 0")


def open_model(repository: Path, model: str, version: int | None) -> Source:
    """The FAISS model's config and index; TuneError naming what is wrong."""
    if not repository.is_dir():
        raise TuneError(f"--repository {repository} is not a directory")
    model_dir = repository / model
    if not model or "/" in model or not model_dir.is_dir():
        known = sorted(p.name for p in repository.iterdir()
                       if p.is_dir() and not p.name.startswith((".", "_")))
        raise TuneError(f"--model '{model}' is not in repository {repository}, expected one of: "
                        f"{', '.join(known) or '(none)'}")
    numbers = model_versions.versions(model_dir)
    if not numbers:
        raise TuneError(f"model '{model}' has no version folders in {model_dir}")
    if version is not None and version not in numbers:
        raise TuneError(f"--from-version {version} of model '{model}' does not exist, expected "
                        f"one of {numbers}")
    number = numbers[-1] if version is None else version
    try:
        config = model_config.read_config(model_dir)
        probe = config if config is not None else model_config.parse_config("", model)
        backend = model_config.backend_of(probe, model_dir / str(number))
    except ConfigError as exc:
        raise TuneError(str(exc)) from None
    if backend != "faiss":
        raise TuneError(f"model '{model}' is served by the '{backend}' backend, expected a FAISS "
                        "model (backend \"faiss\", an index.faiss)")
    filename = model_config.model_filename(probe, "faiss")
    try:
        index = read_index(model, model_dir / str(number) / filename)
    except ConfigError as exc:
        raise TuneError(str(exc)) from None
    return Source(model_dir, config, number, index, filename)


def _parameter(config: Any, key: str) -> str:
    if config is None or key not in config.parameters:
        return ""
    return str(config.parameters[key].string_value)


def _ground_truth_vectors(source: Source, vectors_path: Path | None,
                          ids_path: Path | None) -> tuple[Array, Array, str]:
    """(ids, vectors, where they came from) of the vectors exact search runs over."""
    index = source.index
    if vectors_path is None:
        stored = index_sweep.stored_vectors(index)
        if stored is None:
            raise TuneError(
                f"the served {index_kind(index)} index does not keep its vectors "
                "exactly (PQ / SQ / fp16 codes), expected --vectors: the vectors it was built from"
            )
        return stored[0], stored[1], "the served index's own vectors"
    try:
        vectors = np.ascontiguousarray(index_build.load_vectors(vectors_path), dtype=np.float32)
        if vectors.shape[1] != index.d:
            raise TuneError(f"--vectors {vectors_path} have dimension {vectors.shape[1]}, "
                            f"expected {index.d} (the index's)")
        if ids_path is not None:
            ids = index_build.load_ids(ids_path, len(vectors))
        else:
            added = index_sweep.added_ids(index)
            ids = added if added is not None and len(added) == len(vectors) \
                else np.arange(len(vectors), dtype=np.int64)
    except index_build.BuildError as exc:
        raise TuneError(str(exc)) from None
    if len(vectors) != index.ntotal:
        raise TuneError(f"--vectors {vectors_path} hold {len(vectors):,} vectors, but the served "
                        f"index holds {index.ntotal:,}, expected the vectors it was built from")
    return ids, vectors, str(vectors_path)


def _build_factories(factories: tuple[str, ...], ids: Array, vectors: Array, metric: str,
                     train_size: int | None, progress: bool) -> list[Candidate]:
    built = []
    row_ids = np.array_equal(ids, np.arange(len(ids)))
    for factory in factories:
        _say(progress, f"building {factory} over {len(vectors):,} vectors ...")
        try:
            index = index_build.make_index(factory, vectors.shape[1], metric)
            index = index_build.train_and_add(index, vectors, None if row_ids else ids,
                                              train_size)
        except index_build.BuildError as exc:
            raise TuneError(str(exc).replace("--factory", "--factories")) from None
        built.append(index_sweep.candidate(factory, index))
    return built


def _say(progress: bool, text: str) -> None:
    if progress:
        print(f"tachyon index tune: {text}", file=sys.stderr, flush=True)


def choose(candidates: list[Candidate], optimize: str) -> Candidate | None:
    """The fastest candidate that meets the recall on the tuning queries (with --optimize
    memory: the smallest, then the fastest)."""
    met = [c for c in candidates if c.chosen is not None]
    if not met:
        return None
    if optimize == "memory":
        return min(met, key=lambda c: (c.memory_bytes, -c.chosen.qps if c.chosen else 0.0))
    return max(met, key=lambda c: c.chosen.qps if c.chosen else 0.0)


def tune(repository: Path, model: str, queries_path: Path, options: TuneOptions, *,
         holdout_path: Path | None = None, vectors_path: Path | None = None,
         ids_path: Path | None = None, from_version: int | None = None,
         progress: bool = False, write: bool = True) -> TuneResult:
    """The whole tune. Bad input raises TuneError before any sweep; a recall no candidate
    meets returns a result with `failure` set and nothing written."""
    check_options(options)
    source = open_model(repository, model, from_version)
    index = source.index
    metric = index_sweep.metric_of(index)
    k = options.k or int(_parameter(source.config, "k") or DEFAULT_K)
    if k > index.ntotal:
        raise TuneError(f"k {k} is more than the {index.ntotal} vectors of the index")
    if options.factories and vectors_path is None:
        raise TuneError("--factories builds new indexes, expected --vectors: the vectors to "
                        "build them from")
    for factory in options.factories:  # refuse a bad string before any work
        try:
            index_build.make_index(factory, index.d, metric)
        except index_build.BuildError as exc:
            raise TuneError(str(exc).replace("--factory", "--factories")) from None
    queries = index_sweep.load_queries(queries_path, index.d)
    holdout = index_sweep.load_queries(holdout_path, index.d, "--holdout") \
        if holdout_path is not None else None
    tuning, held = index_sweep.split(queries, holdout, options.seed)
    threads = options.threads or int(_parameter(source.config, "omp_threads")
                                      or max(1, (os.cpu_count() or 2) // 2))
    ids, vectors, exact_from = _ground_truth_vectors(source, vectors_path, ids_path)
    _say(progress, f"exact neighbours of {len(tuning) + len(held):,} queries over "
         f"{len(vectors):,} vectors ...")
    exact_tuning = index_sweep.exact_neighbours(ids, vectors, metric, tuning, k)
    exact_held = index_sweep.exact_neighbours(ids, vectors, metric, held, k)
    candidates = [index_sweep.candidate(f"served v{source.version}", index)]
    candidates += _build_factories(options.factories, ids, vectors, metric, options.train_size,
                                   progress)
    how = index_sweep.Settings(k, options.recall, options.sigmas, options.batch, threads,
                               options.measure_s)
    for c in candidates:
        _say(progress, f"sweeping {c.name} ({c.kind}) ...")
        index_sweep.sweep(c, tuning, exact_tuning, how)
        index_sweep.verify(c, held, exact_held, k)
    if sum(c.met for c in candidates) > 1:  # compared on speed: measure the choices longer
        for c in candidates:
            index_sweep.remeasure(c, tuning, how)
    chosen = choose(candidates, options.optimize)
    info = _info(model, source, options, k, metric, threads, exact_from, len(vectors),
                 queries_path, holdout_path, len(tuning), len(held))
    result = TuneResult(candidates, chosen, info)
    if chosen is None or chosen.chosen is None:
        best = max((p.recall for c in candidates for p in c.points), default=0.0)
        result.failure = (f"no index meets recall@{k} >= {options.recall} on the tuning "
                          f"queries (best: {best:.4f}); nothing written")
    elif chosen.holdout_recall is not None and chosen.holdout_recall < options.recall:
        result.failure = (
            f"{chosen.name} at {chosen.parameter}={chosen.chosen.value} meets the recall on the "
            f"tuning queries ({chosen.chosen.recall:.4f}) but not on the held-out ones "
            f"({chosen.holdout_recall:.4f} < {options.recall}); nothing written (give more "
            "queries, or a larger --sigmas)")
    result.report = report.files(info, candidates, chosen)
    if write and not result.failure and chosen is not None:
        result.published = _publish(source, model, chosen, k, metric, result.report)
    return result


def _info(model: str, source: Source, options: TuneOptions, k: int, metric: str, threads: int,
          exact_from: str, count: int, queries_path: Path, holdout_path: Path | None,
          tuning: int, held: int) -> dict[str, Any]:
    from server.bench.report import command_line, machine

    queries = (f"{tuning:,} tuning queries from {queries_path}, {held:,} held-out from "
               f"{holdout_path}" if holdout_path is not None else
               f"{queries_path}, split at random (seed {options.seed}) into {tuning:,} tuning "
               f"and {held:,} held-out queries")
    return {
        "model": model, "command": command_line(), "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "source_version": source.version,
        "count": count, "dimension": int(source.index.d), "metric": metric, "k": k,
        "recall": options.recall, "sigmas": options.sigmas, "exact_from": exact_from,
        "queries": queries, "tuning_queries": tuning, "holdout_queries": held,
        "batch": options.batch, "threads": threads, "measure_s": options.measure_s,
        "optimize": "fastest index that meets the recall" if options.optimize == "qps"
        else "smallest index that meets the recall (then the fastest)",
    }


def _publish(source: Source, model: str, chosen: Candidate, k: int, metric: str,
             files: dict[str, bytes]) -> model_versions.Published:
    from server.backends.faiss import import_faiss

    assert chosen.chosen is not None
    parameters = {"k": str(k), "metric": metric}
    if chosen.parameter is not None:
        parameters[chosen.parameter] = str(chosen.chosen.value)
    try:
        config = index_build.make_config(model, int(chosen.index.d), parameters,
                                         existing=source.config)
    except index_build.BuildError as exc:
        raise TuneError(str(exc)) from None
    filename = config.default_model_filename or index_build.INDEX_FILE
    data = import_faiss().serialize_index(chosen.index).tobytes()
    return model_versions.publish(source.model_dir, {filename: data, **files},
                                  text_format.MessageToString(config))


# -- command line ---------------------------------------------------------------------------


def _factories(text: str) -> tuple[str, ...]:
    return tuple(f.strip() for f in text.split(";") if f.strip())


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`tachyon index tune ...`"""
    p = commands.add_parser(
        "tune",
        help="choose nprobe / efSearch (and the index) for a recall target; write a new version",
        description="Sweep nprobe (IVF) or efSearch (HNSW) of a served FAISS model against exact "
        "search on tuning queries, check the smallest setting that meets --recall on held-out "
        "queries, and write it as the model's next version with a report (recall, queries/s, "
        "memory) and a plot. Exit status: 0 written, 1 the recall was not met (nothing "
        "written), 2 bad input.")
    p.add_argument("--repository", type=Path, required=True, metavar="REPO",
                   help="the model repository")
    p.add_argument("--model", required=True, metavar="NAME", help="the FAISS model to tune")
    p.add_argument("--queries", type=Path, required=True, metavar="Q.npy",
                   help="queries, float32 [n, d] .npy or .fvecs; half tune, half are held out")
    p.add_argument("--holdout", type=Path, default=None, metavar="H.npy",
                   help="separate held-out queries (then all of --queries tune)")
    p.add_argument("--recall", type=float, required=True, metavar="R",
                   help="recall@k to meet, 0 < R <= 1")
    p.add_argument("--k", type=int, default=None, metavar="K",
                   help="neighbours per query (default: the config's parameters.k)")
    p.add_argument("--vectors", type=Path, default=None, metavar="V.npy",
                   help="the vectors the index was built from: needed for exact neighbours when "
                   "the index keeps only codes (PQ, SQ, fp16), and for --factories")
    p.add_argument("--ids", type=Path, default=None, metavar="I.npy",
                   help="the ids of --vectors (default: the index's IDMap, else row numbers)")
    p.add_argument("--factories", type=_factories, default=(), metavar='"F1;F2;..."',
                   help='also build these index_factory strings from --vectors and compare them, '
                   'e.g. "IVF1024,Flat;IVF1024,PQ32;IVF1024,SQ8;IVF1024,SQfp16"')
    p.add_argument("--train-size", type=int, default=None, metavar="N",
                   help="vectors each --factories index trains on (default: as `index build`)")
    p.add_argument("--optimize", choices=OPTIMIZE, default="qps",
                   help="among candidates meeting the recall: the fastest (qps) or the smallest "
                   "(memory)")
    p.add_argument("--batch", type=int, default=32, metavar="N",
                   help="queries per search call when measuring speed (default: 32)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="OpenMP threads when measuring (default: the config's omp_threads, else "
                   "half the cores, as the server)")
    p.add_argument("--sigmas", type=float, default=2.0, metavar="Z",
                   help="margin: the tuning recall less Z standard errors over the queries must "
                   "meet --recall (default: 2)")
    p.add_argument("--measure-s", type=float, default=index_sweep.MEASURE_S, metavar="S",
                   help="seconds of searching behind each queries/s figure (default: "
                   f"{index_sweep.MEASURE_S:g})")
    p.add_argument("--from-version", type=int, default=None, metavar="N",
                   help="the version to tune (default: the latest)")


def run(args: argparse.Namespace) -> int:
    """`tachyon index tune`: 0 written, 1 recall not met or a failed write, 2 bad input."""
    options = TuneOptions(args.recall, args.k, args.factories, args.optimize, args.batch,
                          args.threads, args.sigmas, measure_s=args.measure_s,
                          train_size=args.train_size)
    try:
        result = tune(args.repository, args.model, args.queries, options,
                      holdout_path=args.holdout, vectors_path=args.vectors, ids_path=args.ids,
                      from_version=args.from_version, progress=True)
    except (TuneError, ConfigError) as exc:
        print(f"tachyon index tune: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"tachyon index tune: error: cannot write the version: {exc}", file=sys.stderr)
        return 1
    print(report.table(result.candidates, options.recall, result.chosen))
    if result.failure:
        print(f"tachyon index tune: {result.failure}", file=sys.stderr)
        return 1
    published, chosen = result.published, result.chosen
    assert published is not None and chosen is not None and chosen.chosen is not None
    setting = f"{chosen.parameter}={chosen.chosen.value}" if chosen.parameter else "no setting"
    print(f"model '{args.model}' version {published.version}: {chosen.name}, {setting}, recall "
          f"{chosen.chosen.recall:.4f} tuning / {chosen.holdout_recall:.4f} held-out, "
          f"{chosen.chosen.qps:,.0f} queries/s -> {published.version_dir}")
    note = model_versions.policy_note(model_config.read_config(published.config_path.parent),
                                      published)
    if note:
        print(f"tachyon index tune: {note}", file=sys.stderr)
    return 0
