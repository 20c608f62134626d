"""ONNX Runtime backend: one InferenceSession per model instance."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from server import gpus
from server.backends.base import Backend, Options
from server.backends.buffers import pinned_memory_works
from server.backends.ort_binding import IoBinding
from server.backends.ort_providers import (
    CPU,
    CUDA,
    TENSORRT,
    ProviderPlan,
    plan_providers,
    select_providers,
)
from server.backends.ort_session import create_session
from server.model_config import ConfigError, complete_batching, set_tensor
from server.types import Array, DataType, TensorSpec

log = logging.getLogger(__name__)

_ONNX_TYPES = {
    1: DataType.FP32,
    2: DataType.UINT8,
    3: DataType.INT8,
    4: DataType.UINT16,
    5: DataType.INT16,
    6: DataType.INT32,
    7: DataType.INT64,
    8: DataType.BYTES,
    9: DataType.BOOL,
    10: DataType.FP16,
    11: DataType.FP64,
    12: DataType.UINT32,
    13: DataType.UINT64,
}
# ONNX Runtime's type strings ("tensor(float)") -> DataType
_ORT_TYPES = {
    "tensor(float)": DataType.FP32,
    "tensor(uint8)": DataType.UINT8,
    "tensor(int8)": DataType.INT8,
    "tensor(uint16)": DataType.UINT16,
    "tensor(int16)": DataType.INT16,
    "tensor(int32)": DataType.INT32,
    "tensor(int64)": DataType.INT64,
    "tensor(string)": DataType.BYTES,
    "tensor(bool)": DataType.BOOL,
    "tensor(float16)": DataType.FP16,
    "tensor(double)": DataType.FP64,
    "tensor(uint32)": DataType.UINT32,
    "tensor(uint64)": DataType.UINT64,
}

__all__ = ["CPU", "CUDA", "TENSORRT", "OnnxRuntimeBackend", "select_providers"]


def _graph_tensors(values: Any, initializers: set[str]) -> list[tuple[str, DataType, list[int]]]:
    found = []
    for value in values:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        datatype = _ONNX_TYPES.get(tensor_type.elem_type)
        if datatype is None:
            raise ConfigError(
                f"ONNX tensor '{value.name}' has element type {tensor_type.elem_type}, "
                "which Tachyon cannot serve"
            )
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim]
        found.append((value.name, datatype, dims))
    return found


class OnnxRuntimeBackend(Backend):
    platform = "onnxruntime_onnx"

    @classmethod
    def complete_config(cls, config: Any, version_dir: Path, default_max_batch_size: int) -> None:
        import onnx

        path = version_dir / (config.default_model_filename or "model.onnx")
        try:
            graph = onnx.load(str(path), load_external_data=False).graph
        except Exception as exc:
            raise ConfigError(f"model '{config.name}': cannot read {path}: {exc}") from None
        initializers = {t.name for t in graph.initializer}
        inputs = _graph_tensors(graph.input, initializers)
        outputs = _graph_tensors(graph.output, set())
        config.platform = config.platform or (config.backend and "") or cls.platform
        batchable = all(dims and dims[0] == -1 for _, _, dims in inputs + outputs)
        complete_batching(config, default_max_batch_size, batchable)
        skip = 1 if config.max_batch_size > 0 else 0
        for kind, tensors in (("input", inputs), ("output", outputs)):
            listed = {t.name for t in getattr(config, kind)}
            for name, datatype, dims in tensors:
                if name not in listed:
                    set_tensor(
                        getattr(config, kind).add(), TensorSpec(name, datatype, tuple(dims[skip:]))
                    )

    def load(self) -> None:
        import onnxruntime as ort

        available = ort.get_available_providers()
        on_cuda = self.spec.instance_kind != "KIND_CPU" and CUDA in available
        visible = gpus.visible_gpus() if on_cuda else 0
        plan = plan_providers(
            self.spec, available, self.instance, self.version_dir,
            visible_gpus=visible,
            tensorrt_present=(
                visible > 0 and TENSORRT in available
                and "tensorrt" in self.spec.gpu_accelerators and gpus.tensorrt_libraries()
            ),
            no_gpu_reason=gpus.no_gpu_reason() if on_cuda and not visible else "",
        )
        if self.instance == 0:
            for note in plan.notes:
                log.warning("%s", note)
        path = self.version_dir / self.spec.model_filename
        self.session, plan = create_session(
            ort, path, self._session_options(ort, plan), plan, self.spec, self.instance
        )
        self._check_against_graph()
        self._bytes_inputs = {t.name for t in self.spec.inputs if t.datatype is DataType.BYTES}
        self._bytes_outputs = {t.name for t in self.spec.outputs if t.datatype is DataType.BYTES}
        self._binding = self._io_binding(plan)
        log.info(
            "model '%s' instance %d on %s%s", self.spec.name, self.instance,
            ", ".join(self.session.get_providers()),
            " with I/O binding" if self._binding is not None else "",
        )

    def _session_options(self, ort: Any, plan: ProviderPlan) -> Any:
        params = self.spec.parameters
        options = ort.SessionOptions()
        # Default: half the cores, at most 4, per instance; ONNX Runtime's own default (every
        # core) starves the event loop thread that feeds it on a small machine.
        default_threads = max(1, min(4, (os.cpu_count() or 2) // 2))
        options.intra_op_num_threads = int(
            params.get("intra_op_thread_count", "") or default_threads
        )
        options.inter_op_num_threads = int(params.get("inter_op_thread_count", "0") or 0)
        # Spinning intra-op threads burn a core each between batches; on a small CPU that
        # core is the one the front end needs. Opt back in with allow_spinning "1".
        options.add_session_config_entry(
            "session.intra_op.allow_spinning", params.get("allow_spinning", "0")
        )
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, plan.graph_level)
        options.log_severity_level = 3
        return options

    def _io_binding(self, plan: ProviderPlan) -> IoBinding | None:
        """I/O binding (parameters `io_binding`: "true" / "false"; default: on a GPU). Not
        for models with BYTES tensors, which ONNX Runtime cannot bind."""
        value = self.spec.parameters.get("io_binding", "").lower()
        if value not in ("", "true", "false", "1", "0"):
            raise ConfigError(
                f"model '{self.spec.name}': parameters.io_binding '{value}' is invalid, "
                'expected "true" or "false"'
            )
        wanted = plan.on_gpu if not value else value in ("true", "1")
        if not wanted or self._bytes_inputs or self._bytes_outputs:
            return None
        on_gpu = self.session.get_providers()[0] != CPU
        device_id = int(plan.providers[0][1].get("device_id", 0)) if on_gpu else 0
        pinned = on_gpu and pinned_memory_works(device_id)
        return IoBinding(self.session, "cuda" if on_gpu else "cpu", device_id, pinned)

    def _check_against_graph(self) -> None:
        batch = 1 if self.spec.max_batch_size > 0 else 0
        # graph inputs with an initializer (a default value) may be fed too: optional inputs
        inputs = [*self.session.get_inputs(), *self.session.get_overridable_initializers()]
        for kind, specs, graph in (
            ("input", self.spec.inputs, inputs),
            ("output", self.spec.outputs, self.session.get_outputs()),
        ):
            by_name = {g.name: g for g in graph}
            for spec in specs:
                node = by_name.get(spec.name)
                where = f"model '{self.spec.name}': {kind} '{spec.name}'"
                if node is None:
                    raise ConfigError(
                        f"{where} is not in the ONNX graph, expected one of {sorted(by_name)}"
                    )
                datatype = _ORT_TYPES.get(node.type)
                if datatype is not spec.datatype:
                    raise ConfigError(
                        f"{where}: data_type {spec.datatype.config_name} does not match the "
                        f"graph's {node.type}"
                    )
                shape = node.shape or []
                if len(shape) != len(spec.dims) + batch:
                    raise ConfigError(
                        f"{where}: dims {list(spec.dims)} with max_batch_size "
                        f"{self.spec.max_batch_size} give rank {len(spec.dims) + batch}, "
                        f"but the graph's shape is {shape}"
                    )

    def check_request(self, inputs: dict[str, Array]) -> None:
        """BYTES for a string tensor must be UTF-8: checked per request, so one client's bad
        text cannot fail the other requests of its batch."""
        for name in self._bytes_inputs.intersection(inputs):
            _to_str(name, inputs[name])

    def gather(self, parts: Sequence[dict[str, Array]]) -> dict[str, Array] | None:
        return self._binding.gather(parts) if self._binding is not None else None

    def execute(
        self, inputs: dict[str, Array], outputs: list[str], options: Options = ()
    ) -> dict[str, Array]:
        if self._binding is not None:
            return self._binding.run(inputs, outputs)
        feed = {}
        for name, array in inputs.items():
            if name in self._bytes_inputs:
                array = _to_str(name, array)
            feed[name] = array
        results = self.session.run(outputs, feed)
        out: dict[str, Array] = {}
        for name, array in zip(outputs, results, strict=True):
            if name in self._bytes_outputs:
                array = _to_bytes(array)
            out[name] = array
        return out

    def unload(self) -> None:
        binding = self.__dict__.pop("_binding", None)
        if binding is not None:
            binding.release()
        self.__dict__.pop("session", None)


def _to_str(name: str, array: Array) -> Array:
    """ONNX Runtime's string tensors take Python str; the wire carries UTF-8 bytes."""
    try:
        flat = [x.decode("utf-8") if isinstance(x, bytes) else str(x) for x in array.ravel()]
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"input '{name}': BYTES element is not UTF-8 ({exc.reason}), expected UTF-8 text "
            "for an ONNX string tensor"
        ) from None
    return np.array(flat, dtype=object).reshape(array.shape)


def _to_bytes(array: Array) -> Array:
    flat = [x.encode("utf-8") if isinstance(x, str) else bytes(x) for x in array.ravel()]
    return np.array(flat, dtype=object).reshape(array.shape)
