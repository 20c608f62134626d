"""config.pbtxt: parsing, completion from the model file, validation.

The protobuf `ModelConfig` (Triton's field names) stays the source of truth and is what the
ModelConfig RPC returns; `ModelSpec` is the typed, validated view the rest of the server reads.
Every error names the model, the field, the value and what was expected.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import json_format, text_format

from server import gpus, proto
from server.types import DataType, TensorSpec

CONFIG_FILE = "config.pbtxt"

# platform / backend names as Triton spells them -> our backend module
_PLATFORMS = {
    "onnxruntime_onnx": "onnxruntime",
    "onnxruntime": "onnxruntime",
    "tensorrt_plan": "tensorrt",
    "tensorrt": "tensorrt",
    "faiss": "faiss",
    "tokenizer": "tokenizer",
    "lookup": "lookup",
    "ensemble": "ensemble",
}
_DEFAULT_FILES = {
    "onnxruntime": "model.onnx",
    "tensorrt": "model.plan",
    "faiss": "index.faiss",
    "tokenizer": "tokenizer.json",
    "lookup": "texts.json",
}


class ConfigError(ValueError):
    """A config.pbtxt that cannot be served, with a message naming the model and field."""


@dataclass(frozen=True, slots=True)
class QueuePolicy:
    max_queue_size: int = 0  # 0: unbounded
    default_timeout_us: int = 0  # 0: no timeout
    timeout_action_reject: bool = True  # REJECT (True) or DELAY (False)
    allow_timeout_override: bool = False


@dataclass(frozen=True, slots=True)
class DynamicBatching:
    """`dynamic_batching { ... }`, Triton semantics."""

    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_us: int = 0
    preserve_ordering: bool = False
    priority_levels: int = 0  # 0: a single level
    default_priority_level: int = 0
    default_queue_policy: QueuePolicy = field(default_factory=QueuePolicy)
    priority_queue_policy: dict[int, QueuePolicy] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Accelerator:
    """One `optimization.execution_accelerators.gpu_execution_accelerator` entry."""

    name: str
    parameters: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """The validated view of one model's config."""

    name: str
    backend: str
    max_batch_size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    model_filename: str
    instance_count: int = 1
    instance_kind: str = "KIND_AUTO"
    dynamic_batching: DynamicBatching | None = None
    parameters: dict[str, str] = field(default_factory=dict)
    platform: str = ""
    gpu_accelerators: tuple[str, ...] = ()
    accelerators: tuple[Accelerator, ...] = ()  # the same entries, with their parameters
    graph_level: int = 0  # optimization.graph.level
    # the GPUs of each instance, in instance order: (g,) for KIND_GPU (`count` instances on
    # each listed GPU, or on each visible one when none is listed), the whole list for
    # KIND_MODEL, () otherwise (a GPU instance then takes GPU `instance % visible GPUs`)
    instance_gpus: tuple[tuple[int, ...], ...] = ()
    response_cache: bool = False  # response_cache.enable (server/cached_scheduler.py)
    # name -> spec, built once: every request looks its inputs and outputs up
    _inputs: dict[str, TensorSpec] = field(init=False, repr=False, compare=False)
    _outputs: dict[str, TensorSpec] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_inputs", {t.name: t for t in self.inputs})
        object.__setattr__(self, "_outputs", {t.name: t for t in self.outputs})

    def input(self, name: str) -> TensorSpec | None:
        return self._inputs.get(name)

    def output(self, name: str) -> TensorSpec | None:
        return self._outputs.get(name)


def read_config(model_dir: Path) -> Any | None:
    """Parse `<model_dir>/config.pbtxt` into a protobuf ModelConfig; None when absent."""
    path = model_dir / CONFIG_FILE
    if not path.exists():
        return None
    return parse_config(path.read_text(encoding="utf-8"), model_dir.name)


def parse_config(text: str, model_name: str) -> Any:
    config = proto.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise ConfigError(f"model '{model_name}': {CONFIG_FILE} is not valid: {exc}") from None
    if not config.name:
        config.name = model_name
    return config


def parse_config_json(text: str, model_name: str) -> Any:
    """A config given as JSON (RepositoryModelLoad's `config` parameter, as in Triton)."""
    config = proto.ModelConfig()
    try:
        json_format.Parse(text, config)
    except json_format.ParseError as exc:
        raise ConfigError(
            f"model '{model_name}': the 'config' parameter is not valid: {exc}"
        ) from None
    if not config.name:
        config.name = model_name
    return config


def backend_of(config: Any, version_dir: Path | None) -> str:
    """The backend a config names, or the one its model file implies."""
    for key in (config.backend, config.platform):
        if key:
            if key not in _PLATFORMS:
                raise ConfigError(
                    f"model '{config.name}': platform/backend '{key}' is not supported, "
                    f"expected one of {', '.join(sorted(_PLATFORMS))}"
                )
            return _PLATFORMS[key]
    if version_dir is not None:
        for backend, filename in _DEFAULT_FILES.items():
            if (version_dir / filename).exists():
                return backend
    raise ConfigError(
        f"model '{config.name}': no platform or backend in {CONFIG_FILE} and no model file "
        f"({', '.join(_DEFAULT_FILES.values())}) to infer it from"
    )


def model_filename(config: Any, backend: str) -> str:
    return str(config.default_model_filename) or _DEFAULT_FILES.get(backend, "")


def is_complete(config: Any) -> bool:
    return bool(len(config.input) and len(config.output))


def enum_name(message: Any, field_name: str) -> str:
    """The name of an enum field's value (TYPE_FP32, KIND_CPU, REJECT)."""
    enum_type = message.DESCRIPTOR.fields_by_name[field_name].enum_type
    return str(enum_type.values_by_number[getattr(message, field_name)].name)


def _tensor_specs(config: Any, kind: str) -> tuple[TensorSpec, ...]:
    specs = []
    seen: set[str] = set()
    for index, tensor in enumerate(getattr(config, kind)):
        where = f"model '{config.name}': {kind}[{index}]"
        if not tensor.name:
            raise ConfigError(f"{where}: name is empty, expected a tensor name")
        if tensor.name in seen:
            raise ConfigError(f"{where}: name '{tensor.name}' appears twice, expected unique names")
        seen.add(tensor.name)
        type_name = enum_name(tensor, "data_type")
        try:
            datatype = DataType.from_config(type_name)
        except ValueError:
            raise ConfigError(
                f"{where} '{tensor.name}': data_type {type_name} is not supported, expected one "
                f"of {', '.join(d.config_name for d in DataType)}"
            ) from None
        dims = tuple(int(d) for d in tensor.dims)
        if any(d < -1 or d == 0 for d in dims):
            raise ConfigError(
                f"{where} '{tensor.name}': dims {list(dims)} are invalid, expected positive "
                "sizes or -1 for a variable dimension"
            )
        if tensor.HasField("reshape") and list(tensor.reshape.shape) != list(dims):
            raise ConfigError(
                f"{where} '{tensor.name}': reshape is not supported yet, expected dims only"
            )
        optional = bool(getattr(tensor, "optional", False))
        specs.append(TensorSpec(tensor.name, datatype, dims, optional))
    return tuple(specs)


def _queue_policy(policy: Any) -> QueuePolicy:
    return QueuePolicy(
        max_queue_size=int(policy.max_queue_size),
        default_timeout_us=int(policy.default_timeout_microseconds),
        timeout_action_reject=enum_name(policy, "timeout_action") == "REJECT",
        allow_timeout_override=bool(policy.allow_timeout_override),
    )


def _dynamic_batching(config: Any) -> DynamicBatching | None:
    if not config.HasField("dynamic_batching"):
        return None
    db = config.dynamic_batching
    where = f"model '{config.name}': dynamic_batching"
    preferred = tuple(int(s) for s in db.preferred_batch_size)
    for size in preferred:
        if size < 1 or (config.max_batch_size and size > config.max_batch_size):
            raise ConfigError(
                f"{where}.preferred_batch_size {size} is invalid, expected 1.."
                f"{config.max_batch_size} (max_batch_size)"
            )
    levels = int(db.priority_levels)
    default_level = int(db.default_priority_level)
    if levels and not 1 <= default_level <= levels:
        raise ConfigError(
            f"{where}.default_priority_level {default_level} is invalid, expected 1..{levels}"
        )
    per_level = {}
    for level, policy in db.priority_queue_policy.items():
        if not 1 <= level <= levels:
            raise ConfigError(
                f"{where}.priority_queue_policy key {level} is invalid, expected 1..{levels}"
            )
        per_level[int(level)] = _queue_policy(policy)
    return DynamicBatching(
        preferred_batch_sizes=tuple(sorted(preferred)),
        max_queue_delay_us=int(db.max_queue_delay_microseconds),
        preserve_ordering=bool(db.preserve_ordering),
        priority_levels=levels,
        default_priority_level=default_level,
        default_queue_policy=_queue_policy(db.default_queue_policy),
        priority_queue_policy=per_level,
    )


def fill_defaults(config: Any, backend: str) -> None:
    """Write the defaults Triton reports for a loaded model into the config, in place."""
    if not config.HasField("version_policy"):
        config.version_policy.latest.num_versions = 1
    if not config.platform and not config.backend:
        config.platform = _default_platform(backend)
    if not config.backend:
        config.backend = backend
    if not len(config.instance_group):
        config.instance_group.add(count=1)
    for index, group in enumerate(config.instance_group):
        group.name = group.name or f"{config.name}_{index}"
        group.count = group.count or 1
    if not config.default_model_filename and backend in _DEFAULT_FILES:
        config.default_model_filename = _DEFAULT_FILES[backend]


def check_supported(config: Any, backend: str) -> None:
    """Refuse config sections Tachyon does not implement, naming the section: serving the
    model without them would answer differently from what the config asks for.

    Refused: sequence_batching, ensemble_scheduling on a model that is not an ensemble (and
    steps' model_namespace), model_transaction_policy.decoupled,
    model_repository_agents, batch_input, batch_output, model_operations, model_metrics,
    cc_model_filenames, runtime, reshape, is_shape_tensor, allow_ragged_batch and
    is_non_linear_format_io on tensors, instance_group secondary_devices, profile, passive,
    instance groups of different kinds, and
    optimization.execution_accelerators.cpu_execution_accelerator. (`gpus` and the GPU
    accelerators' parameters are checked by `_instance_gpus` and by the backend at load.)

    Accepted and ignored, as Triton itself ignores them unless a server flag turns them on or
    the backend is one Tachyon does not have (performance hints, not semantics):
    instance_group rate_limiter and host_policy, optimization priority / cuda /
    pinned memory / gather_kernel_buffer_threshold / eager_batching, metric_tags, tensor
    format, ensemble_scheduling.max_inflight_responses (it only limits decoupled steps).
    """
    refused = _unsupported(config, backend)
    if refused:
        raise ConfigError(
            f"model '{config.name}': {refused} is not supported by Tachyon, expected a config "
            "without it (see the README, Model repository)"
        )


def _unsupported(config: Any, backend: str) -> str:
    """The first unsupported section of a config, as a field path; "" when none."""
    sections = [
        ("sequence_batching", config.HasField("sequence_batching")),
        ("ensemble_scheduling (on a model that is not an ensemble)",
         backend != "ensemble" and config.HasField("ensemble_scheduling")),
        ("model_transaction_policy.decoupled", config.model_transaction_policy.decoupled),
        ("model_repository_agents", len(config.model_repository_agents.agents) > 0),
        ("batch_input", len(config.batch_input) > 0),
        ("batch_output", len(config.batch_output) > 0),
        ("model_operations", len(config.model_operations.op_library_filename) > 0),
        ("model_metrics", len(config.model_metrics.metric_control) > 0),
        ("cc_model_filenames", len(config.cc_model_filenames) > 0),
        ("runtime", bool(config.runtime)),
        ("optimization.execution_accelerators.cpu_execution_accelerator",
         len(config.optimization.execution_accelerators.cpu_execution_accelerator) > 0),
    ]
    for section, present in sections:
        if present:
            return section
    for index, step in enumerate(config.ensemble_scheduling.step):
        if step.model_namespace:
            return f"ensemble_scheduling.step[{index}].model_namespace"
    for kind in ("input", "output"):
        for index, tensor in enumerate(getattr(config, kind)):
            for flag in ("is_shape_tensor", "allow_ragged_batch", "is_non_linear_format_io"):
                if getattr(tensor, flag, False):
                    return f"{kind}[{index}] '{tensor.name}': {flag}"
    kinds = {int(g.kind) for g in config.instance_group}
    if len(kinds) > 1:
        return "instance_group with groups of different kinds"
    for index, group in enumerate(config.instance_group):
        where = f"instance_group[{index}]"
        if len(group.secondary_devices):
            return f"{where}.secondary_devices"
        if len(group.profile):
            return f"{where}.profile"
        if group.passive:
            return f"{where}.passive"
    return ""


def _instance_gpus(
    config: Any, visible_gpus: Callable[[], int]
) -> tuple[tuple[int, ...], ...]:
    """The GPUs of every instance, as Triton places them: a KIND_GPU (or KIND_AUTO) group
    with `gpus` has `count` instances on each listed GPU, and a KIND_GPU group without them
    `count` on each visible GPU; a KIND_MODEL group has `count` instances that each get the
    whole list (the backend decides, e.g. FAISS shards)."""
    placements: list[tuple[int, ...]] = []
    for index, group in enumerate(config.instance_group):
        gpus = tuple(int(g) for g in group.gpus)
        kind = enum_name(group, "kind")
        where = f"model '{config.name}': instance_group[{index}].gpus {list(gpus)}"
        if any(g < 0 for g in gpus) or len(set(gpus)) != len(gpus):
            raise ConfigError(f"{where} is invalid, expected distinct GPU indexes >= 0")
        if gpus and kind == "KIND_CPU":
            raise ConfigError(f"{where} is invalid for KIND_CPU, expected no gpus")
        count = max(int(group.count), 1)
        if kind == "KIND_GPU" and not gpus:
            gpus = tuple(range(visible_gpus()))  # none visible: the load error says why
        if kind == "KIND_MODEL" or not gpus:
            placements += [gpus] * count
        else:
            placements += [(g,) for g in gpus for _ in range(count)]
    return tuple(placements) or ((),)


def read_labels(config: Any, version_dir: Path) -> dict[str, tuple[str, ...]]:
    """The class labels of each output with a `label_filename` (one label per line, line i
    for class i), read from the version folder or else the model folder, for the
    classification extension."""
    labels = {}
    for output in config.output:
        filename = output.label_filename
        if not filename:
            continue
        where = f"model '{config.name}': output '{output.name}'"
        relative = Path(filename)
        if relative.is_absolute() or ".." in relative.parts:
            raise ConfigError(
                f"{where}: label_filename '{filename}' is not allowed, expected a file name "
                "inside the model folder"
            )
        candidates = [version_dir / relative, version_dir.parent / relative]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise ConfigError(
                f"{where}: label_filename '{filename}' does not exist, expected it in "
                f"{version_dir} or {version_dir.parent}"
            )
        labels[output.name] = tuple(path.read_text(encoding="utf-8").splitlines())
    return labels


def to_spec(
    config: Any, backend: str, visible_gpus: Callable[[], int] = gpus.visible_gpus
) -> ModelSpec:
    """Validate a complete config and return its typed view. `visible_gpus` (asked only for a
    KIND_GPU group that lists no GPUs) places instances on this host's GPUs."""
    name = config.name
    _check_response_cache(config)
    check_supported(config, backend)
    if config.max_batch_size < 0:
        raise ConfigError(
            f"model '{name}': max_batch_size {config.max_batch_size} is invalid, expected >= 0"
        )
    inputs = _tensor_specs(config, "input")
    outputs = _tensor_specs(config, "output")
    if not inputs or not outputs:
        raise ConfigError(
            f"model '{name}': {CONFIG_FILE} lists {len(inputs)} inputs and {len(outputs)} "
            "outputs, expected at least one of each (or no config, to complete from the model)"
        )
    kind = "KIND_AUTO"
    if len(config.instance_group):
        kind = enum_name(config.instance_group[0], "kind")
    instance_gpus = _instance_gpus(config, visible_gpus)
    batching = _dynamic_batching(config)
    accelerators = config.optimization.execution_accelerators.gpu_execution_accelerator
    if batching is not None and config.max_batch_size == 0:
        batching = None  # Triton ignores dynamic batching for non-batching models
    return ModelSpec(
        name=name,
        backend=backend,
        max_batch_size=int(config.max_batch_size),
        inputs=inputs,
        outputs=outputs,
        model_filename=model_filename(config, backend),
        instance_count=len(instance_gpus),
        instance_kind=kind,
        dynamic_batching=batching,
        parameters={k: v.string_value for k, v in config.parameters.items()},
        platform=config.platform or _default_platform(backend),
        gpu_accelerators=tuple(a.name for a in accelerators),
        accelerators=tuple(Accelerator(a.name, dict(a.parameters)) for a in accelerators),
        graph_level=int(config.optimization.graph.level),
        instance_gpus=instance_gpus,
        response_cache=bool(config.response_cache.enable),
    )


def _check_response_cache(config: Any) -> None:
    """`response_cache { enable: true }` only where a response depends on the request alone,
    as Triton has it: not with sequence batching (state carried between requests) nor for a
    decoupled model (any number of responses). The backend checks its model at load
    (server/cache_policy.py)."""
    if not config.response_cache.enable:
        return
    for section, present in (
        ("sequence_batching", config.HasField("sequence_batching")),
        ("model_transaction_policy.decoupled", config.model_transaction_policy.decoupled),
    ):
        if present:
            raise ConfigError(
                f"model '{config.name}': response_cache.enable is true with {section}, whose "
                "responses do not depend on the request alone, expected response_cache.enable "
                "false"
            )


def _default_platform(backend: str) -> str:
    return {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}.get(backend, backend)


def complete_batching(config: Any, default_max_batch_size: int, batchable: bool = True) -> None:
    """For a config that lists no inputs and no max_batch_size: batch up to the server's
    default size with dynamic batching on, as Triton's auto-complete does."""
    if len(config.input) or config.max_batch_size != 0:
        return
    if batchable and default_max_batch_size > 0:
        config.max_batch_size = default_max_batch_size
        if not config.HasField("dynamic_batching"):
            config.dynamic_batching.SetInParent()


def set_tensor(message: Any, spec: TensorSpec) -> None:
    """Fill a ModelInput/ModelOutput message from a TensorSpec."""
    message.name = spec.name
    message.data_type = message.DESCRIPTOR.fields_by_name["data_type"].enum_type.values_by_name[
        spec.datatype.config_name
    ].number
    del message.dims[:]
    message.dims.extend(spec.dims)
