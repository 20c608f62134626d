"""Recall and speed of FAISS indexes against exact search (the measuring half of `tachyon index
tune`).

Recall@k of a query is the share of its exact k nearest neighbours (an IndexFlat over the same
vectors, same metric) that the index returns; a sweep raises nprobe (IVF) or efSearch (HNSW)
along a grid until the tuning queries' recall, less `sigmas` standard errors over the queries,
reaches the target. Speed is queries per second of in-process `search` on batches of `batch`
queries with `threads` OpenMP threads.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from server.backends.faiss import apply_search_parameters, import_faiss, index_kind, metric_name
from server.types import Array

MEASURE_S = 0.3  # each point searches the tuning queries for at least this long (default)
EXTRA_POINTS = 2  # grid points measured past the chosen one, to show the curve beyond it
MAX_EF_SEARCH = 4096


class TuneError(Exception):
    """Bad input to a tune: the message says what to fix (exit code 2)."""


# -- queries ---------------------------------------------------------------------------------


def read_fvecs(path: Path) -> Array:
    """An .fvecs file (each row: int32 d, then d float32) as a float32 [n, d] array."""
    raw = np.fromfile(path, dtype=np.int32)
    if raw.size == 0:
        raise TuneError(f"queries file {path} is empty, expected .fvecs rows")
    d = int(raw[0])
    if d < 1 or raw.size % (d + 1):
        raise TuneError(f"queries file {path} is not .fvecs: {raw.size * 4} bytes do not split "
                        f"into rows of 4 + {d} x 4 bytes")
    rows = raw.reshape(-1, d + 1)
    if not (rows[:, 0] == d).all():
        raise TuneError(f"queries file {path} is not .fvecs: rows of different dimensions")
    return rows[:, 1:].copy().view(np.float32)


def load_queries(path: Path, dimension: int, flag: str = "--queries") -> Array:
    """Queries from a .npy [n, d] or .fvecs file, checked against the index dimension."""
    if not path.is_file():
        raise TuneError(f"{flag} file {path} does not exist")
    if path.suffix == ".fvecs":
        queries = read_fvecs(path)
    else:
        try:
            queries = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise TuneError(f"{flag} file {path} is not a .npy array or .fvecs file: {exc}") \
                from None
    if queries.ndim != 2 or queries.dtype.kind != "f":
        raise TuneError(f"{flag} {path} hold {queries.dtype} {list(queries.shape)}, expected "
                        "float32 [n, d]")
    if queries.shape[1] != dimension:
        raise TuneError(f"{flag} {path} have dimension {queries.shape[1]}, expected "
                        f"{dimension} (the index's)")
    if not np.isfinite(queries).all():
        raise TuneError(f"{flag} {path} hold NaN or infinity, expected finite values")
    return np.ascontiguousarray(queries, dtype=np.float32)


def split(queries: Array, holdout: Array | None, seed: int = 0) -> tuple[Array, Array]:
    """(tuning, held-out): `holdout` when given, else a random half of the queries each."""
    if holdout is not None:
        if len(queries) < 1 or len(holdout) < 1:
            raise TuneError("--queries and --holdout need at least one query each")
        return queries, holdout
    if len(queries) < 2:
        raise TuneError(f"--queries hold {len(queries)} query, expected at least 2 (half are "
                        "held out)")
    order = np.random.default_rng(seed).permutation(len(queries))
    half = len(queries) // 2
    return queries[order[:half]], queries[order[half:]]


# -- exact neighbours --------------------------------------------------------------------------


def _inner(index: Any) -> Any:
    faiss = import_faiss()
    return faiss.downcast_index(index)


def stored_vectors(index: Any) -> tuple[Array, Array] | None:
    """(ids, vectors) when the index keeps its vectors exactly (Flat, IVF-Flat, HNSW-Flat, with
    or without an IDMap), else None: a PQ / SQ / fp16 code reconstructs only approximately."""
    faiss = import_faiss()
    index = _inner(index)
    ids: Array | None = None
    if isinstance(index, faiss.IndexIDMap):
        ids = faiss.vector_to_array(index.id_map).astype(np.int64)
        index = _inner(index.index)
    if isinstance(index, faiss.IndexFlat):
        vectors = index.reconstruct_n(0, index.ntotal)
    elif isinstance(index, faiss.IndexHNSWFlat):
        vectors = _inner(index.storage).reconstruct_n(0, index.ntotal)
    elif isinstance(index, faiss.IndexIVFFlat):
        ids, vectors = _ivf_vectors(index)
    else:
        return None
    if ids is None:
        ids = np.arange(len(vectors), dtype=np.int64)
    return ids, np.ascontiguousarray(vectors, dtype=np.float32)


def added_ids(index: Any) -> Array | None:
    """The ids of an IDMap in the order the vectors were added (None for other indexes, whose
    ids, if any, are the rows of the vectors they were built from, or unknown)."""
    faiss = import_faiss()
    index = _inner(index)
    if isinstance(index, faiss.IndexIDMap):
        ids: Array = faiss.vector_to_array(index.id_map).astype(np.int64)
        return ids
    return None


def _ivf_vectors(ivf: Any) -> tuple[Array, Array]:
    """Every (id, vector) of an IVF-Flat index, list by list (its codes are the raw floats)."""
    faiss = import_faiss()
    lists = ivf.invlists
    ids, vectors = [], []
    for number in range(ivf.nlist):
        size = lists.list_size(number)
        if size == 0:
            continue
        ids.append(faiss.rev_swig_ptr(lists.get_ids(number), size).copy())
        codes = faiss.rev_swig_ptr(lists.get_codes(number), size * ivf.code_size)
        vectors.append(np.frombuffer(codes.copy(), dtype=np.float32).reshape(size, ivf.d))
    if not ids:
        return np.zeros(0, np.int64), np.zeros((0, ivf.d), np.float32)
    return np.concatenate(ids).astype(np.int64), np.concatenate(vectors)


def exact_neighbours(ids: Array, vectors: Array, metric: str, queries: Array, k: int) -> Array:
    """The ids of each query's exact k nearest neighbours, [n, k] (on every core)."""
    faiss = import_faiss()
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    flat = faiss.IndexFlatIP(vectors.shape[1]) if metric == "INNER_PRODUCT" \
        else faiss.IndexFlatL2(vectors.shape[1])
    flat.add(vectors)
    _, rows = flat.search(queries, k)
    found: Array = np.where(rows >= 0, ids[np.maximum(rows, 0)], -1)
    return found


def recall_per_query(found: Array, exact: Array) -> Array:
    """Per query, the share of its exact neighbours (ids >= 0) among `found`."""
    valid = exact >= 0
    hits = ((found[:, :, None] == exact[:, None, :]) & valid[:, None, :]).any(axis=1)
    counts = np.maximum(valid.sum(axis=1), 1)
    share: Array = hits.sum(axis=1) / counts
    return share


# -- sweeps ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Point:
    """One setting of an index: recall on the tuning queries and in-process speed."""

    value: int | None  # nprobe / efSearch; None: the index has no such setting
    recall: float
    recall_low: float  # recall less `sigmas` standard errors over the queries
    qps: float


@dataclass(slots=True)
class Candidate:
    """An index and its sweep."""

    name: str  # "served v3" or the factory string
    kind: str  # IndexIVFFlat, IndexIDMap(IndexHNSWFlat), ...
    index: Any
    memory_bytes: int
    parameter: str | None  # "nprobe" | "efSearch" | None
    points: list[Point] = field(default_factory=list)
    chosen: Point | None = None
    holdout_recall: float | None = None

    @property
    def met(self) -> bool:
        return self.chosen is not None


def parameter_of(index: Any) -> tuple[str, int] | None:
    """("nprobe", nlist) for IVF indexes, ("efSearch", cap) for HNSW, None for the others."""
    faiss = import_faiss()
    try:
        return "nprobe", int(faiss.extract_index_ivf(index).nlist)
    except RuntimeError:
        pass
    inner = _inner(index)
    while not isinstance(inner, faiss.IndexHNSW) and isinstance(
        inner, faiss.IndexIDMap | faiss.IndexPreTransform
    ):
        inner = _inner(inner.index)
    if isinstance(inner, faiss.IndexHNSW):
        return "efSearch", MAX_EF_SEARCH
    return None


def grid(parameter: str, upper: int, k: int) -> list[int]:
    """1, 2, 3, 4, 6, 8, 12, ... (steps of about 1.5x) up to `upper`, which is included;
    efSearch starts at k (FAISS searches at least k wide)."""
    values, step = [], 1
    while step < upper:
        values += [step, step + step // 2] if step > 1 else [1]
        step *= 2
    values = sorted({v for v in values if v < upper} | {upper})
    if parameter == "efSearch":
        values = sorted({max(v, k) for v in values})
    return values


def memory_bytes(index: Any) -> int:
    faiss = import_faiss()
    return int(faiss.serialize_index(index).size)


def search_timed(
    index: Any, queries: Array, k: int, batch: int, threads: int, seconds: float = MEASURE_S
) -> tuple[Array, float]:
    """The ids found for every query, and queries per second: the median over passes of the
    whole set (at least 3, and at least `seconds` in all)."""
    faiss = import_faiss()
    faiss.omp_set_num_threads(threads)
    found: Array | None = None
    rates: list[float] = []
    spent = 0.0
    while len(rates) < 3 or spent < seconds:
        start = time.perf_counter()
        parts = [index.search(queries[i : i + batch], k)[1] for i in range(0, len(queries), batch)]
        elapsed = time.perf_counter() - start
        if found is None:
            found = np.concatenate(parts)
        rates.append(len(queries) / max(elapsed, 1e-9))
        spent += elapsed
    assert found is not None
    return found, float(np.median(rates))


@dataclass(frozen=True, slots=True)
class Settings:
    """How a sweep measures: the recall target, its margin, and the speed measurement."""

    k: int
    target: float
    sigmas: float
    batch: int
    threads: int
    seconds: float = MEASURE_S


def measure(index: Any, parameter: str | None, value: int | None, queries: Array,
            exact: Array, settings: Settings) -> Point:
    if parameter is not None and value is not None:
        apply_search_parameters(index, {parameter: value})
    found, qps = search_timed(index, queries, settings.k, settings.batch, settings.threads,
                              settings.seconds)
    per_query = recall_per_query(found, exact)
    mean = float(per_query.mean())
    stderr = float(per_query.std(ddof=1) / np.sqrt(len(per_query))) if len(per_query) > 1 else 0.0
    return Point(value, mean, mean - settings.sigmas * stderr, qps)


def sweep(candidate: Candidate, queries: Array, exact: Array, how: Settings) -> None:
    """Measure the candidate along its grid; `chosen` is the first point whose recall_low
    reaches `target` (None when none does). Leaves the index at the chosen value."""
    setting = parameter_of(candidate.index)
    values: list[int | None] = [None]
    if setting is not None:
        values = list(grid(setting[0], setting[1], how.k))
    extra = 0
    for value in values:
        point = measure(candidate.index, candidate.parameter, value, queries, exact, how)
        candidate.points.append(point)
        if candidate.chosen is None and point.recall_low >= how.target:
            candidate.chosen = point
        elif candidate.chosen is not None:
            extra += 1
            if extra >= EXTRA_POINTS:
                break
    if candidate.chosen is not None and candidate.parameter is not None:
        apply_search_parameters(candidate.index, {candidate.parameter: candidate.chosen.value or 1})


def remeasure(candidate: Candidate, queries: Array, how: Settings, factor: float = 3.0) -> None:
    """Measure the chosen point's speed again, `factor` times as long (candidates are compared
    on it, and one short sweep point is noisy on a shared machine)."""
    if candidate.chosen is None:
        return
    _, qps = search_timed(candidate.index, queries, how.k, how.batch, how.threads,
                          how.seconds * factor)
    at = candidate.points.index(candidate.chosen)
    candidate.chosen = candidate.points[at] = dataclasses.replace(candidate.chosen, qps=qps)


def verify(candidate: Candidate, holdout: Array, exact: Array, k: int) -> None:
    """Recall on the held-out queries at the chosen setting (index left there)."""
    if candidate.chosen is None:
        return
    _, ids = candidate.index.search(holdout, k)
    candidate.holdout_recall = float(recall_per_query(ids, exact).mean())


def candidate(name: str, index: Any) -> Candidate:
    settings = parameter_of(index)
    return Candidate(name, index_kind(index), index, memory_bytes(index),
                     settings[0] if settings else None)


def metric_of(index: Any) -> str:
    return metric_name(index.metric_type)
