"""FAISS backend: a nearest-neighbour index (`index.faiss`) served as a model.

Anything `faiss.read_index` reads serves: Flat, IVF, HNSW, PQ, with or without an IDMap. The
model takes `QUERY` (FP32 [-1, d]) and answers the k nearest stored vectors: `DISTANCES` (FP32
[-1, k]) and `IDS` (INT64 [-1, k]; -1 where the index holds fewer than k vectors). Search
settings come from config.pbtxt `parameters`: `k`, `max_k`, `nprobe` (IVF), `efSearch` (HNSW),
and `metric` ("L2" | "INNER_PRODUCT"), which load checks against the index. A request may
override `k` (up to `max_k`), `nprobe` and `efSearch` with request parameters of those names;
requests with the same overrides share a batch.

Each instance owns its copy of the index (on a GPU when one is present and the instance group
allows it: `index_cpu_to_gpu` with the instance's own GpuResources; a KIND_MODEL group's
instances shard the index over all its `gpus`) and runs one `index.search` per batch on its
own thread, with `omp_threads` OpenMP threads (set on that thread); FAISS releases the GIL
inside. The GPU build's limits (k and nprobe up to 2048, GPU_MAX_SELECTION_K; faiss-gpu-cuvs's
cuVS path, off by default in 1.15, allows 16384) are checked at load, the index file's own
nprobe too, and an index FAISS has no GPU version of (HNSW, PQ, SQ8...) is never called a GPU
index: its multi-GPU cloner hands such an index back as a CPU copy without an error.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from server import extras
from server.backends.base import Backend, Options
from server.model_config import ConfigError, ModelSpec, complete_batching, set_tensor
from server.types import Array, DataType, Parameters, TensorSpec

log = logging.getLogger(__name__)

QUERY, DISTANCES, IDS = "QUERY", "DISTANCES", "IDS"
DEFAULT_K = 10
GPU_MAX_K = 2048  # the largest k FAISS's GPU k-selection supports
GPU_MAX_NPROBE = 2048  # GPU IVF indexes select the nprobe lists with the same k-selection
FAISS_GPU_WHEELS = ("faiss-gpu", "faiss-gpu-cu12", "faiss-gpu-cuvs")
METRICS = {"L2": "L2", "INNER_PRODUCT": "INNER_PRODUCT", "IP": "INNER_PRODUCT"}
_OUTPUT_TYPES = {DISTANCES: DataType.FP32, IDS: DataType.INT64}
_SEARCH_PARAMETERS = {"nprobe": "nprobe", "efSearch": "efSearch"}  # config key -> FAISS name


def is_gpu_build(faiss: Any) -> bool:
    """Whether this `faiss` module was built with GPU support (faiss-gpu-cu12, faiss-gpu)."""
    return "GPU" in str(faiss.get_compile_options()).split()


def no_gpu_reason(gpu_build: bool, version: str, cuda_visible_devices: str | None) -> str:
    """Why FAISS sees no GPU, and what to do, for a load error."""
    if not gpu_build:
        fix = extras.gpu_build_clash("faiss-cpu", FAISS_GPU_WHEELS) or (
            "install a GPU build in its place (the [gpu] extra: faiss-gpu), or use KIND_CPU"
        )
        return f"this faiss {version} is a CPU-only build (faiss-cpu); {fix}"
    hidden = ""
    if cuda_visible_devices is not None:
        hidden = f"CUDA_VISIBLE_DEVICES={cuda_visible_devices!r}; "
    return (
        f"this faiss {version} is a GPU build, but CUDA reports no device ({hidden}no NVIDIA "
        "driver, or no GPU visible to this process); use KIND_CPU, or KIND_AUTO to run on a GPU "
        "only where there is one"
    )


def use_gpu(
    num_gpus: int, instance_kind: str, listed: tuple[int, ...] = (), why_none: str = ""
) -> bool:
    """Whether an instance runs on a GPU.

    KIND_CPU never does; KIND_GPU must (an error without one), and so must a KIND_MODEL group
    that lists `gpus` (the index is sharded over them); KIND_AUTO and an unlisted KIND_MODEL
    do when FAISS sees a GPU, as Triton places KIND_AUTO instances and as the ONNX Runtime
    backend does. `why_none` (see `no_gpu_reason`) ends the error.
    """
    if instance_kind == "KIND_CPU":
        return False
    if instance_kind == "KIND_GPU" or (instance_kind == "KIND_MODEL" and listed):
        if num_gpus < 1:
            asked = f"instance_group kind {instance_kind}"
            if listed:
                asked += f" gpus {list(listed)}"
            raise ConfigError(
                f"{asked} needs a GPU, but FAISS sees none: "
                f"{why_none or 'install the [gpu] extra, or use KIND_CPU'}"
            )
        return True
    return num_gpus > 0


def gpu_limit_reason(max_k: int, search: dict[str, int], index_nprobe: int | None = None) -> str:
    """Why a GPU index cannot serve these settings ("" when it can): k and nprobe above what
    FAISS's GPU k-selection supports (`index_nprobe`: the nprobe the index file holds, which
    serves when the config sets none)."""
    if max_k > GPU_MAX_K:
        return f"parameters.max_k {max_k} is more than the GPU's limit {GPU_MAX_K}"
    nprobe = search.get("nprobe", 0)
    if nprobe > GPU_MAX_NPROBE:
        return f"parameters.nprobe {nprobe} is more than the GPU's limit {GPU_MAX_NPROBE}"
    if not nprobe and index_nprobe is not None and index_nprobe > GPU_MAX_NPROBE:
        return (
            f"the index's own nprobe {index_nprobe} is more than the GPU's limit "
            f"{GPU_MAX_NPROBE}, expected parameters.nprobe <= {GPU_MAX_NPROBE}"
        )
    return ""


def listed_gpus(spec: ModelSpec, instance: int) -> tuple[int, ...]:
    """The GPUs the instance group lists for one instance (none listed: ())."""
    return spec.instance_gpus[instance] if instance < len(spec.instance_gpus) else ()


def gpu_devices(spec: ModelSpec, instance: int, num_gpus: int) -> tuple[int, ...]:
    """The GPUs one instance's index goes to: what its instance group lists (several for a
    KIND_MODEL group: the index is sharded over them), else GPU `instance % num_gpus`."""
    listed = listed_gpus(spec, instance)
    if not listed:
        return (instance % num_gpus,)
    missing = [g for g in listed if g >= num_gpus]
    if missing:
        raise ConfigError(
            f"model '{spec.name}': instance_group gpus {list(listed)} lists GPU {missing[0]}, "
            f"but FAISS sees {num_gpus} GPU(s), expected 0..{num_gpus - 1}"
        )
    return listed


def faiss_reason(exc: BaseException) -> str:
    """The part of a FAISS error a user can act on, without its C++ function and source line."""
    text = str(exc).strip()
    match = re.search(r"at \S+:\d+: (?:Error: '.*?' failed: )?(.*)", text, re.DOTALL)
    return (match.group(1) if match else text).strip() or type(exc).__name__


def import_faiss() -> Any:
    """The faiss module, or a ConfigError that says what to install."""
    # faiss logs six INFO lines about the CPU instructions it tried; keep warnings only
    # (faiss-gpu-cu12's wrapper loads the same code as `faiss._loader`)
    for name in ("faiss.loader", "faiss._loader"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        import faiss
    except ImportError as exc:
        raise ConfigError(extras.missing("the faiss backend", "faiss", exc)) from None
    return faiss


def read_index(model: str, path: Path) -> Any:
    faiss = import_faiss()
    if not path.is_file():
        raise ConfigError(f"model '{model}': index file {path} does not exist")
    try:
        return faiss.read_index(str(path))
    except RuntimeError as exc:
        raise ConfigError(
            f"model '{model}': cannot read {path} as a FAISS index: {faiss_reason(exc)}"
        ) from None


def metric_name(metric_type: int) -> str:
    """FAISS's metric constant -> its name ("L2", "INNER_PRODUCT", "L1", ...)."""
    import faiss

    for name in dir(faiss):
        if name.startswith("METRIC_") and getattr(faiss, name) == metric_type:
            return name.removeprefix("METRIC_")
    return str(metric_type)


def index_kind(index: Any) -> str:
    """A short description for messages: 'IndexIDMap(IndexHNSWFlat)'."""
    import faiss

    index = faiss.downcast_index(index)
    inner = getattr(index, "index", None)
    if inner is not None and isinstance(index, faiss.IndexIDMap | faiss.IndexPreTransform):
        return f"{type(index).__name__}({index_kind(inner)})"
    return type(index).__name__


def _current(index: Any, name: str) -> int | None:
    """The index's own nprobe / efSearch (through IDMap and pre-transform wrappers)."""
    import faiss

    try:
        if name == "nprobe":
            return int(faiss.extract_index_ivf(index).nprobe)
        inner: Any = faiss.downcast_index(index)
        while not hasattr(inner, "hnsw") and hasattr(inner, "index"):  # IDMap, pre-transform
            inner = faiss.downcast_index(inner.index)
        return int(inner.hnsw.efSearch)
    except (RuntimeError, AttributeError):
        return None


def apply_search_parameters(index: Any, parameters: dict[str, int], space: Any = None) -> None:
    """Set `nprobe` / `efSearch` on an index (through IDMap and pre-transform wrappers);
    raises ValueError naming the parameter when the index has no such setting."""
    import faiss

    space = space or faiss.ParameterSpace()
    for name, value in parameters.items():
        try:
            space.set_index_parameter(index, _SEARCH_PARAMETERS[name], value)
        except RuntimeError:
            raise ValueError(
                f"parameters.{name} {value} does not apply to this {index_kind(index)} index "
                f"({'IVF' if name == 'nprobe' else 'HNSW'} indexes only), expected no {name}"
            ) from None


@dataclass(frozen=True, slots=True)
class SearchSettings:
    """The validated search parameters of one model."""

    k: int
    max_k: int
    metric: str | None  # "L2" | "INNER_PRODUCT"; None: not checked
    search: dict[str, int]  # nprobe / efSearch, as FAISS names them


def _positive_int(model: str, key: str, value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise ConfigError(
            f"model '{model}': parameters.{key} '{value}' is invalid, expected a positive integer"
        )
    return number


def _output_k(spec: ModelSpec) -> int | None:
    """k as the outputs' last dimension says it, when they say it."""
    found: dict[str, int] = {}
    for tensor in spec.outputs:
        if tensor.dims and tensor.dims[-1] > 0:
            found[tensor.name] = tensor.dims[-1]
    if len(set(found.values())) > 1:
        raise ConfigError(
            f"model '{spec.name}': outputs have different k in their dims {found}, expected "
            "the same last dimension"
        )
    return next(iter(found.values()), None)


def search_settings(spec: ModelSpec) -> SearchSettings:
    """Read and validate `parameters` (k, max_k, nprobe, efSearch, metric) of a config."""
    params = spec.parameters
    from_dims = _output_k(spec)
    k = from_dims or DEFAULT_K
    if params.get("k"):
        k = _positive_int(spec.name, "k", params["k"])
        if from_dims is not None and k != from_dims:
            raise ConfigError(
                f"model '{spec.name}': parameters.k {k} does not match the outputs' dims "
                f"[{from_dims}], expected {from_dims}"
            )
    max_k = _positive_int(spec.name, "max_k", params["max_k"]) if params.get("max_k") else k
    if k > max_k:
        raise ConfigError(
            f"model '{spec.name}': parameters.k {k} is more than parameters.max_k {max_k}, "
            f"expected k <= {max_k}"
        )
    metric = None
    if params.get("metric"):
        metric = METRICS.get(params["metric"].upper())
        if metric is None:
            raise ConfigError(
                f"model '{spec.name}': parameters.metric '{params['metric']}' is not supported, "
                "expected L2 or INNER_PRODUCT"
            )
    search = {
        key: _positive_int(spec.name, key, params[key])
        for key in _SEARCH_PARAMETERS
        if params.get(key)
    }
    return SearchSettings(k, max_k, metric, search)


def check_config(spec: ModelSpec, settings: SearchSettings, dimension: int, metric: str) -> None:
    """Compare a config with its index: QUERY is FP32 [d], the outputs are DISTANCES FP32
    [k] / IDS INT64 [k], the metric is the index's. Raises ConfigError naming the field."""
    lead: tuple[int, ...] = () if spec.max_batch_size > 0 else (-1,)
    names = [t.name for t in spec.inputs]
    if names != [QUERY]:
        raise ConfigError(
            f"model '{spec.name}': inputs {names} are not served by a FAISS index, expected "
            f"one input '{QUERY}'"
        )
    query = spec.inputs[0]
    where = f"model '{spec.name}': input '{QUERY}'"
    if query.datatype is not DataType.FP32:
        raise ConfigError(f"{where}: data_type {query.datatype.config_name}, expected TYPE_FP32")
    if len(query.dims) != len(lead) + 1 or query.dims[-1] != dimension:
        raise ConfigError(
            f"{where}: dims {list(query.dims)} do not match the index dimension {dimension}, "
            f"expected {[*lead, dimension]}"
        )
    for tensor in spec.outputs:
        where = f"model '{spec.name}': output '{tensor.name}'"
        expected_type = _OUTPUT_TYPES.get(tensor.name)
        if expected_type is None:
            raise ConfigError(
                f"{where} is not produced by a FAISS index, expected {DISTANCES} or {IDS}"
            )
        if tensor.datatype is not expected_type:
            raise ConfigError(
                f"{where}: data_type {tensor.datatype.config_name}, expected "
                f"{expected_type.config_name}"
            )
        if len(tensor.dims) != len(lead) + 1:
            raise ConfigError(
                f"{where}: dims {list(tensor.dims)} have the wrong rank, expected "
                f"{[*lead, settings.k]}"
            )
    if settings.metric is not None and settings.metric != metric:
        raise ConfigError(
            f"model '{spec.name}': parameters.metric '{settings.metric}' does not match the "
            f"index's metric, expected '{metric}'"
        )


class FaissBackend(Backend):
    platform = "faiss"

    @classmethod
    def complete_config(cls, config: Any, version_dir: Path, default_max_batch_size: int) -> None:
        path = version_dir / (config.default_model_filename or "index.faiss")
        index = read_index(config.name, path)
        complete_batching(config, default_max_batch_size)
        k = DEFAULT_K
        listed_k = [int(o.dims[-1]) for o in config.output if len(o.dims) and o.dims[-1] > 0]
        if "k" in config.parameters and config.parameters["k"].string_value:
            k = _positive_int(config.name, "k", config.parameters["k"].string_value)
        elif listed_k:
            k = listed_k[0]
        lead: tuple[int, ...] = () if config.max_batch_size > 0 else (-1,)
        tensors = {
            "input": [TensorSpec(QUERY, DataType.FP32, (*lead, int(index.d)))],
            "output": [
                TensorSpec(DISTANCES, DataType.FP32, (*lead, k)),
                TensorSpec(IDS, DataType.INT64, (*lead, k)),
            ],
        }
        for kind, specs in tensors.items():
            listed = {t.name for t in getattr(config, kind)}
            for spec in specs:
                if spec.name not in listed:
                    set_tensor(getattr(config, kind).add(), spec)

    def load(self) -> None:
        faiss = import_faiss()
        spec = self.spec
        # FAISS's OpenMP threads spin-wait: on a small machine two of them beside the event
        # loop ran a Flat search 7x slower than one (15 vs 107 q/s, 200k x 128, 2 cores).
        # Default: half the cores; `omp_threads` overrides. OpenMP keeps the count per calling
        # thread, so `execute` sets it on each thread that searches (once per thread).
        default_threads = max(1, (os.cpu_count() or 2) // 2)
        self._omp_threads = int(spec.parameters.get("omp_threads", "") or default_threads)
        self._omp_set = threading.local()
        settings = search_settings(spec)
        index = read_index(spec.name, self.version_dir / spec.model_filename)
        check_config(spec, settings, int(index.d), metric_name(index.metric_type))
        try:
            apply_search_parameters(index, settings.search)
        except ValueError as exc:
            raise ConfigError(f"model '{spec.name}': {exc}") from None
        self.k = settings.k
        self.max_k = settings.max_k
        kind = index_kind(index)
        # the search settings this index has, and their values when no request overrides them
        self._tunable = {
            name: value for name, value in (
                ("nprobe", _current(index, "nprobe") if "IVF" in kind else None),
                ("efSearch", _current(index, "efSearch") if "HNSW" in kind else None),
            ) if value is not None
        }
        self._gpu_resources: Any = None
        self._space: Any = None  # a GpuParameterSpace on the GPU
        listed = listed_gpus(spec, self.instance)
        why_none = no_gpu_reason(
            is_gpu_build(faiss), faiss.__version__, os.environ.get("CUDA_VISIBLE_DEVICES")
        )
        try:
            on_gpu = use_gpu(faiss.get_num_gpus(), spec.instance_kind, listed, why_none)
        except ConfigError as exc:
            raise ConfigError(f"model '{spec.name}': {exc}") from None
        if on_gpu:
            index = self._to_gpu(
                index, settings, required=spec.instance_kind in ("KIND_GPU", "KIND_MODEL")
            )
        self.index = index
        log.info(
            "model '%s' instance %d: %s index, %d vectors of dimension %d, k %d, on %s",
            spec.name,
            self.instance,
            index_kind(index),
            index.ntotal,
            index.d,
            self.k,
            "GPU" if self._gpu_resources is not None else "CPU",
        )

    def _to_gpu(self, index: Any, settings: SearchSettings, required: bool) -> Any:
        """The index on this instance's GPU(s), with its own GpuResources per GPU (sharded
        when the instance has several); with KIND_AUTO an index the GPU cannot hold stays
        on the CPU, with KIND_GPU (or KIND_MODEL) that is a ConfigError."""
        import faiss

        devices = gpu_devices(self.spec, self.instance, faiss.get_num_gpus())
        reason = gpu_limit_reason(settings.max_k, settings.search, self._tunable.get("nprobe"))
        if not reason:
            resources = [faiss.StandardGpuResources() for _ in devices]
            try:
                gpu_index = clone_to_gpus(faiss, resources, devices, index)
                apply_search_parameters(gpu_index, settings.search, faiss.GpuParameterSpace())
            except (RuntimeError, ValueError) as exc:
                reason = faiss_reason(exc)
            else:
                self._gpu_resources = resources  # must outlive the index that uses them
                self._space = faiss.GpuParameterSpace()
                return gpu_index
        where = f"GPU {devices[0]}" if len(devices) == 1 else f"GPUs {list(devices)}"
        if required:
            raise ConfigError(
                f"model '{self.spec.name}': instance_group kind {self.spec.instance_kind}, but "
                f"the {index_kind(index)} index cannot run on {where}: {reason}"
            )
        log.info(
            "model '%s' instance %d stays on the CPU: %s", self.spec.name, self.instance, reason
        )
        return index

    def check_request(self, inputs: dict[str, Array]) -> None:
        query = inputs[QUERY]
        finite = np.isfinite(query)
        if not finite.all():
            row, column = (int(i[0]) for i in np.nonzero(~finite))
            raise ValueError(
                f"model '{self.spec.name}': input '{QUERY}' row {row} holds "
                f"{query[row, column]} at column {column}, expected finite FP32 values"
            )

    def request_options(self, parameters: Parameters) -> Options:
        options: list[tuple[str, bool | int | float | str]] = []
        for name in ("k", "nprobe", "efSearch"):
            value = parameters.get(name)
            if value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(
                    f"model '{self.spec.name}': parameter '{name}' is {value!r}, expected a "
                    "positive integer"
                )
            if name == "k" and value > self.max_k:
                raise ValueError(
                    f"model '{self.spec.name}': parameter 'k' is {value}, expected 1..{self.max_k} "
                    "(parameters.max_k)"
                )
            if name != "k" and name not in self._tunable:
                raise ValueError(
                    f"model '{self.spec.name}': parameter '{name}' does not apply to this "
                    f"{index_kind(self.index)} index, expected none"
                )
            if name == "nprobe" and self._gpu_resources is not None and value > GPU_MAX_NPROBE:
                raise ValueError(
                    f"model '{self.spec.name}': parameter 'nprobe' is {value}, expected "
                    f"1..{GPU_MAX_NPROBE} (the GPU index's limit)"
                )
            options.append((name, value))
        return tuple(options)

    def execute(
        self, inputs: dict[str, Array], outputs: list[str], options: Options = ()
    ) -> dict[str, Array]:
        if not getattr(self._omp_set, "done", False):
            import faiss

            faiss.omp_set_num_threads(self._omp_threads)
            self._omp_set.done = True
        query = np.ascontiguousarray(inputs[QUERY], dtype=np.float32)
        self.check_request({QUERY: query})  # requests were checked one by one; this is cheap
        requested = dict(options)
        search = {n: int(v) for n, v in requested.items() if n != "k"}
        if search:
            apply_search_parameters(self.index, search, self._space)
        try:
            distances, ids = self.index.search(query, int(requested.get("k", self.k)))
        finally:
            if search:  # back to the model's own settings for the next batch
                apply_search_parameters(
                    self.index, {n: self._tunable[n] for n in search}, self._space
                )
        found = {DISTANCES: distances, IDS: ids}
        return {name: found[name] for name in outputs}

    def unload(self) -> None:
        self.__dict__.pop("index", None)  # before the GPU resources it may use
        self.__dict__.pop("_space", None)
        self.__dict__.pop("_gpu_resources", None)


def cpu_parts(faiss: Any, index: Any) -> list[str]:
    """The parts of a cloned index that search on the CPU (their class names), looking through
    shards, replicas, IDMap and pre-transform wrappers; [] when all of it is on GPUs."""
    index = faiss.downcast_index(index)
    if isinstance(index, getattr(faiss, "GpuIndex", ())):
        return []
    if isinstance(index, faiss.IndexShards | faiss.IndexReplicas):
        return [part for i in range(index.count()) for part in cpu_parts(faiss, index.at(i))]
    if isinstance(index, faiss.IndexIDMap | faiss.IndexPreTransform):
        return cpu_parts(faiss, index.index)
    return [type(index).__name__]


def clone_to_gpus(faiss: Any, resources: list[Any], devices: tuple[int, ...], index: Any) -> Any:
    """`index_cpu_to_gpu` on one GPU; on several, one shard per GPU. ValueError when part of
    the result would search on the CPU: FAISS's multi-GPU cloner copies an index type it has no
    GPU version of (HNSW, PQ, SQ8, ...) as a CPU index instead of failing."""
    if len(devices) == 1:
        cloned = faiss.index_cpu_to_gpu(resources[0], devices[0], index)
    else:
        options = faiss.GpuMultipleClonerOptions()
        options.shard = True
        cloned = faiss.index_cpu_to_gpu_multiple_py(resources, index, options, list(devices))
    left = sorted(set(cpu_parts(faiss, cloned)))
    if left:
        raise ValueError(
            f"FAISS has no GPU version of {', '.join(left)} (it would search on the CPU)"
        )
    return cloned
