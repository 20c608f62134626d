"""`tachyon index build`: vectors on disk -> a FAISS index served as a model.

    tachyon index build --vectors V.npy [--ids I.npy] --factory "IVF1024,PQ32" [--metric L2|IP]
        [--train-size N] [--k 10] --repository REPO --model NAME [--version N]

trains the index on a sample of the vectors, adds them in chunks, and writes
`REPO/NAME/<version>/index.faiss` with a complete `REPO/NAME/config.pbtxt` (backend "faiss").
The version is the next number after the existing ones unless `--version` names a new one.

Writes never leave a half-built model where a polling server can see it: the index goes into a
hidden staging folder of the repository and is renamed into place; the config is replaced
atomically before that, so a served older version either reloads with it or keeps serving.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import text_format

from server import model_config, proto
from server.backends.faiss import (
    DISTANCES,
    IDS,
    QUERY,
    faiss_reason,
    import_faiss,
    index_kind,
)
from server.model_config import ConfigError, set_tensor
from server.types import Array, DataType, TensorSpec

INDEX_FILE = "index.faiss"
DEFAULT_MAX_BATCH_SIZE = 64
DEFAULT_TRAIN_SIZE = 100_000
CHUNK_ROWS = 65_536
CLI_METRICS = {"L2": "L2", "IP": "INNER_PRODUCT"}


class BuildError(Exception):
    """Bad input to a build: the message says what to fix (exit code 2)."""


@dataclass(frozen=True, slots=True)
class BuildResult:
    version: int
    version_dir: Path
    config_path: Path
    count: int
    dimension: int
    parameters: dict[str, str]


# -- inputs --------------------------------------------------------------------------------


def _load_npy(path: Path, what: str) -> Array:
    if not path.is_file():
        raise BuildError(f"{what} file {path} does not exist")
    try:
        array: Array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise BuildError(f"{what} file {path} is not a .npy array: {exc}") from None
    return array


def load_vectors(path: Path) -> Array:
    """The vectors: a 2-D floating-point array [n, d] (memory-mapped; float32 per chunk)."""
    vectors = _load_npy(path, "vectors")
    if vectors.ndim != 2:
        raise BuildError(
            f"vectors {path} have shape {list(vectors.shape)}, expected 2 dimensions [n, d]"
        )
    if vectors.dtype.kind != "f":
        raise BuildError(
            f"vectors {path} have dtype {vectors.dtype}, expected float32 (or float16/float64)"
        )
    count, dimension = vectors.shape
    if count == 0 or dimension == 0:
        raise BuildError(f"vectors {path} have shape {list(vectors.shape)}, expected n, d >= 1")
    for start in range(0, count, CHUNK_ROWS):
        finite = np.isfinite(vectors[start : start + CHUNK_ROWS]).all(axis=1)
        if not finite.all():
            row = start + int(np.argmin(finite))
            raise BuildError(f"vectors {path}: row {row} holds NaN or infinity, expected finite")
    return vectors


def load_ids(path: Path, count: int) -> Array:
    """The ids: a 1-D integer array of `count` unique values >= 0, as int64."""
    ids = _load_npy(path, "ids")
    if ids.ndim != 1:
        raise BuildError(f"ids {path} have shape {list(ids.shape)}, expected 1 dimension [n]")
    if ids.dtype.kind not in "iu":
        raise BuildError(f"ids {path} have dtype {ids.dtype}, expected an integer type (int64)")
    if len(ids) != count:
        raise BuildError(f"ids {path} hold {len(ids)} ids for {count} vectors, expected {count}")
    if ids.dtype.kind == "u" and len(ids) and ids.max() > np.iinfo(np.int64).max:
        raise BuildError(f"ids {path} hold values above {np.iinfo(np.int64).max}")
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) and ids.min() < 0:
        raise BuildError(f"ids {path} hold {ids.min()}, expected ids >= 0 (-1 means 'no result')")
    unique, counts = np.unique(ids, return_counts=True)
    if len(unique) != len(ids):
        repeated = int(unique[np.argmax(counts > 1)])
        raise BuildError(f"ids {path} hold id {repeated} more than once, expected unique ids")
    return ids


# -- the index ------------------------------------------------------------------------------


def make_index(factory: str, dimension: int, metric: str) -> Any:
    """An empty index from a factory string ("Flat", "IVF1024,PQ32", "HNSW32", ...)."""
    faiss = import_faiss()
    metric_type = faiss.METRIC_INNER_PRODUCT if metric == "INNER_PRODUCT" else faiss.METRIC_L2
    try:
        return faiss.index_factory(dimension, factory, metric_type)
    except RuntimeError as exc:
        raise BuildError(
            f"--factory '{factory}' cannot build an index of dimension {dimension}: "
            f"{faiss_reason(exc)} (expected a FAISS index_factory string such as Flat, "
            "IVF1024,PQ32 or HNSW32)"
        ) from None


def _ivf(index: Any) -> Any:
    faiss = import_faiss()
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def _hnsw(index: Any) -> Any:
    faiss = import_faiss()
    while True:
        index = faiss.downcast_index(index)
        if isinstance(index, faiss.IndexHNSW):
            return index
        inner = getattr(index, "index", None)
        if inner is None or not isinstance(index, faiss.IndexIDMap | faiss.IndexPreTransform):
            return None
        index = inner


def default_train_size(index: Any, count: int) -> int:
    """Enough to train: 256 vectors per IVF list (FAISS samples no more), at least 100,000."""
    ivf = _ivf(index)
    lists = int(ivf.nlist) if ivf is not None else 0
    return min(count, max(DEFAULT_TRAIN_SIZE, 256 * lists))


def train_and_add(
    index: Any,
    vectors: Array,
    ids: Array | None = None,
    train_size: int | None = None,
    progress: bool = False,
    seed: int = 0,
) -> Any:
    """Train `index` on a random sample of `train_size` vectors, then add all of them in
    chunks. Returns the index, wrapped in an IDMap when ids are given and it cannot hold ids
    itself (Flat, HNSW, PQ)."""
    faiss = import_faiss()
    count = len(vectors)
    has_id_map = isinstance(index, faiss.IndexIDMap)
    if ids is not None and not has_id_map and _ivf(index) is None:
        index = faiss.IndexIDMap(index)
    if ids is None and has_id_map:
        ids = np.arange(count, dtype=np.int64)
    if not index.is_trained:
        size = default_train_size(index, count) if train_size is None else train_size
        if not 1 <= size <= count:
            raise BuildError(f"--train-size {size} is invalid, expected 1..{count} (the vectors)")
        rows = np.sort(np.random.default_rng(seed).choice(count, size, replace=False))
        sample = np.ascontiguousarray(vectors[rows], dtype=np.float32)
        try:
            index.train(sample)
        except RuntimeError as exc:
            raise BuildError(
                f"training the {index_kind(index)} index on {size} vectors failed: "
                f"{faiss_reason(exc)}"
            ) from None
    _add(index, vectors, ids, progress)
    return index


def _add(index: Any, vectors: Array, ids: Array | None, progress: bool) -> None:
    from tqdm import tqdm

    count = len(vectors)
    with tqdm(
        total=count, unit="vec", desc="adding", disable=not progress or count <= CHUNK_ROWS
    ) as bar:
        for start in range(0, count, CHUNK_ROWS):
            chunk = np.ascontiguousarray(vectors[start : start + CHUNK_ROWS], dtype=np.float32)
            if ids is None:
                index.add(chunk)
            else:
                index.add_with_ids(chunk, ids[start : start + len(chunk)])
            bar.update(len(chunk))


def search_parameters(
    index: Any, k: int, nprobe: int | None = None, ef_search: int | None = None
) -> dict[str, str]:
    """The `parameters` of the config: k, metric, and nprobe (IVF) / efSearch (HNSW) with
    defaults that trade a little speed for recall (FAISS's own, 1 and 16, are low)."""
    from server.backends.faiss import metric_name

    params = {"k": str(k), "metric": metric_name(index.metric_type)}
    ivf = _ivf(index)
    if ivf is not None:
        nprobe = nprobe or min(int(ivf.nlist), max(1, round(math.sqrt(ivf.nlist))))
        params["nprobe"] = str(nprobe)
    elif nprobe is not None:
        raise BuildError(f"--nprobe applies to IVF indexes, not {index_kind(index)}")
    if _hnsw(index) is not None:
        params["efSearch"] = str(ef_search or max(64, 2 * k))
    elif ef_search is not None:
        raise BuildError(f"--ef-search applies to HNSW indexes, not {index_kind(index)}")
    return params


# -- the repository ---------------------------------------------------------------------------


def check_model_name(model: str) -> None:
    if not model or model in (".", "..") or any(c in model for c in "/\\\x00") or model[0] in "._":
        raise BuildError(f"--model '{model}' is not allowed, expected a plain folder name")


def next_version(model_dir: Path, version: int | None = None) -> int:
    """The version to write: `version` when it is new, else one after the highest."""
    existing = (
        {int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()}
        if model_dir.is_dir()
        else set()
    )
    if version is None:
        return max(existing, default=0) + 1
    if version < 1:
        raise BuildError(f"--version {version} is invalid, expected a positive integer")
    if version in existing:
        raise BuildError(
            f"version {version} of model '{model_dir.name}' exists in {model_dir}, expected a "
            f"new version (omit --version to write {max(existing) + 1})"
        )
    return version


def make_config(
    model: str,
    dimension: int,
    parameters: dict[str, str],
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    existing: Any = None,
) -> Any:
    """The complete ModelConfig for an index; an existing config keeps what the index does
    not decide (version_policy, instance_group, dynamic_batching settings, other parameters)."""
    config = proto.ModelConfig()
    if existing is not None:
        config.CopyFrom(existing)
        backend = "faiss"
        if existing.backend or existing.platform:
            try:
                backend = model_config.backend_of(existing, None)
            except ConfigError as exc:
                raise BuildError(f"{exc} (fix it or choose another --model)") from None
        if backend != "faiss":
            raise BuildError(
                f"model '{model}' exists with backend '{backend}', expected a FAISS model "
                "(choose another --model)"
            )
    config.name = model
    config.ClearField("platform")
    config.backend = "faiss"
    if config.max_batch_size == 0:
        config.max_batch_size = max_batch_size
    k = int(parameters["k"])
    del config.input[:]
    del config.output[:]
    set_tensor(config.input.add(), TensorSpec(QUERY, DataType.FP32, (dimension,)))
    set_tensor(config.output.add(), TensorSpec(DISTANCES, DataType.FP32, (k,)))
    set_tensor(config.output.add(), TensorSpec(IDS, DataType.INT64, (k,)))
    for key in ("nprobe", "efSearch"):
        if key not in parameters and key in config.parameters:
            del config.parameters[key]  # does not apply to this index
    max_k = config.parameters["max_k"].string_value if "max_k" in config.parameters else ""
    if max_k and (not max_k.isdigit() or int(max_k) < k):
        del config.parameters["max_k"]  # would refuse the new k
    for key, value in parameters.items():
        config.parameters[key].string_value = value
    if not config.HasField("dynamic_batching"):
        config.dynamic_batching.SetInParent()
    return config


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_model(
    index: Any,
    repository: Path,
    model: str,
    parameters: dict[str, str],
    version: int | None = None,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
) -> BuildResult:
    """Write `index` as a new version of `model` and its config.pbtxt into `repository`."""
    faiss = import_faiss()
    check_model_name(model)
    model_dir = repository / model
    number = next_version(model_dir, version)
    existing = None
    if (model_dir / model_config.CONFIG_FILE).exists():
        try:
            existing = model_config.read_config(model_dir)
        except ConfigError as exc:
            raise BuildError(f"{exc} (fix or remove it)") from None
    config = make_config(model, int(index.d), parameters, max_batch_size, existing)
    config_text = text_format.MessageToString(config)
    repository.mkdir(parents=True, exist_ok=True)
    staging = repository / f".staging-{model}-{number}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    fresh = not model_dir.exists()
    target = staging / str(number) if fresh else staging
    target.mkdir(parents=True)
    try:
        faiss.write_index(index, str(target / INDEX_FILE))
        if fresh:  # the whole model appears at once
            (staging / model_config.CONFIG_FILE).write_text(config_text, encoding="utf-8")
            staging.rename(model_dir)
        else:
            config_path = model_dir / model_config.CONFIG_FILE
            old = config_path.read_text(encoding="utf-8") if config_path.exists() else None
            if old != config_text:
                _write_atomically(config_path, config_text)
            staging.rename(model_dir / str(number))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return BuildResult(
        number,
        model_dir / str(number),
        model_dir / model_config.CONFIG_FILE,
        int(index.ntotal),
        int(index.d),
        parameters,
    )


def build(
    vectors_path: Path,
    factory: str,
    repository: Path,
    model: str,
    *,
    ids_path: Path | None = None,
    metric: str = "L2",
    train_size: int | None = None,
    k: int = 10,
    version: int | None = None,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    nprobe: int | None = None,
    ef_search: int | None = None,
    progress: bool = False,
) -> BuildResult:
    """The whole build: read, check, train, add, write. Bad input raises BuildError before
    anything is written."""
    check_model_name(model)
    metric = CLI_METRICS.get(metric.upper(), metric.upper())
    if metric not in CLI_METRICS.values():
        raise BuildError(f"--metric '{metric}' is not supported, expected L2 or IP")
    for flag, value in (("--k", k), ("--max-batch-size", max_batch_size), ("--nprobe", nprobe),
                        ("--ef-search", ef_search)):
        if value is not None and value < 1:
            raise BuildError(f"{flag} {value} is invalid, expected a positive integer")
    next_version(repository / model, version)  # fail before the work, not after it
    vectors = load_vectors(vectors_path)
    count, dimension = vectors.shape
    if k > count:
        raise BuildError(f"--k {k} is more than the {count} vectors, expected k <= {count}")
    ids = load_ids(ids_path, count) if ids_path is not None else None
    index = make_index(factory, dimension, metric)
    parameters = search_parameters(index, k, nprobe, ef_search)
    index = train_and_add(index, vectors, ids, train_size, progress)
    return write_model(index, repository, model, parameters, version, max_batch_size)


# -- command line ---------------------------------------------------------------------------


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`tachyon index build | tune ...`"""
    index = subparsers.add_parser(
        "index", help="build FAISS indexes as models", description="FAISS index tools."
    )
    commands = index.add_subparsers(dest="index_command", required=True, metavar="COMMAND")
    p = commands.add_parser(
        "build",
        help="train and fill a FAISS index and write it as a new model version",
        description="Train a FAISS index on a sample of the vectors, add all of them, and write "
        "REPO/MODEL/<version>/index.faiss with a complete REPO/MODEL/config.pbtxt.",
    )
    p.add_argument("--vectors", type=Path, required=True, metavar="V.npy",
                   help="the vectors, a float32 .npy array [n, d]")
    p.add_argument("--ids", type=Path, default=None, metavar="I.npy",
                   help="an int64 .npy array [n] of unique ids (default: row numbers)")
    p.add_argument("--factory", required=True, metavar="STRING",
                   help='FAISS index_factory string: "Flat", "IVF1024,PQ32", "HNSW32", ...')
    p.add_argument("--metric", choices=tuple(CLI_METRICS), default="L2",
                   help="distance: L2 (squared Euclidean, the default) or IP (inner product)")
    p.add_argument("--train-size", type=int, default=None, metavar="N",
                   help="vectors sampled for training (default: 256 per IVF list, at least "
                   f"{DEFAULT_TRAIN_SIZE:,}, at most all)")
    p.add_argument("--k", type=int, default=10, metavar="K",
                   help="neighbours returned per query (default: 10)")
    p.add_argument("--nprobe", type=int, default=None, metavar="N",
                   help="IVF lists searched per query (default: sqrt(nlist))")
    p.add_argument("--ef-search", type=int, default=None, metavar="N",
                   help="HNSW search breadth (default: max(64, 2k))")
    p.add_argument("--max-batch-size", type=int, default=DEFAULT_MAX_BATCH_SIZE, metavar="N",
                   help=f"max_batch_size of a new config (default: {DEFAULT_MAX_BATCH_SIZE})")
    p.add_argument("--repository", type=Path, required=True, metavar="REPO",
                   help="the model repository")
    p.add_argument("--model", required=True, metavar="NAME", help="the model's folder name")
    p.add_argument("--version", type=int, default=None, metavar="N",
                   help="the version to write (default: one after the highest)")
    from server import index_tune  # it builds on this module

    index_tune.add_parser(commands)


def run(args: argparse.Namespace) -> int:
    """Run `tachyon index <command>`; 0 on success, 2 on bad input, 1 on a failed write."""
    if args.index_command == "tune":
        from server import index_tune

        return index_tune.run(args)
    if args.index_command != "build":
        print(f"tachyon index: unknown command '{args.index_command}'", file=sys.stderr)
        return 2
    started = time.monotonic()
    try:
        result = build(
            args.vectors,
            args.factory,
            args.repository,
            args.model,
            ids_path=args.ids,
            metric=args.metric,
            train_size=args.train_size,
            k=args.k,
            version=args.version,
            max_batch_size=args.max_batch_size,
            nprobe=args.nprobe,
            ef_search=args.ef_search,
            progress=True,
        )
    except (BuildError, ConfigError) as exc:  # ConfigError: FAISS is not installed
        print(f"tachyon index build: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"tachyon index build: error: cannot write the model: {exc}", file=sys.stderr)
        return 1
    params = " ".join(f"{k}={v}" for k, v in result.parameters.items())
    print(
        f"model '{args.model}' version {result.version}: {result.count:,} vectors of dimension "
        f"{result.dimension} ({args.factory}, {params}) in {time.monotonic() - started:.1f} s "
        f"-> {result.version_dir / INDEX_FILE}"
    )
    return 0
