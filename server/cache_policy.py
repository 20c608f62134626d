"""Which models may use the response cache: "never for models that are not deterministic".

Checked at load, for a model whose config enables `response_cache`:
  * config (server/model_config.py): not with sequence_batching, not for a decoupled model;
  * onnxruntime: not when the graph (or a subgraph or local function) holds a random operator
    (RandomNormal, RandomUniform, their -Like forms, Multinomial, Bernoulli): its answers
    change from call to call;
  * faiss, tokenizer, lookup: deterministic (a read-only index searched with the settings the
    key carries; pure functions of the text);
  * ensemble: every model it calls (through nested ensembles too) must pass the same checks.
"Deterministic" means the same request gets the same answer up to floating-point differences
from how requests happened to be batched, as with Triton's cache.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from server.model_config import ConfigError, ModelSpec

RANDOM_OPS = frozenset({
    "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
    "Bernoulli",
})


def check_model(spec: ModelSpec, version_dir: Path) -> None:
    """Refuse `response_cache` for a model whose backend answers differently each call."""
    if not spec.response_cache:
        return
    reason = nondeterminism(spec, version_dir)
    if reason:
        raise ConfigError(
            f"model '{spec.name}': response_cache.enable is true, but {reason}, expected a "
            "deterministic model (or response_cache.enable false)"
        )


def nondeterminism(spec: ModelSpec, version_dir: Path) -> str:
    """Why a model's answers can change between identical requests; "" when they cannot."""
    if spec.backend != "onnxruntime":
        return ""
    import onnx

    path = version_dir / spec.model_filename
    model = onnx.load(str(path), load_external_data=False)
    ops = sorted({node.op_type for node in _nodes(model)} & RANDOM_OPS)
    if ops:
        return f"its ONNX graph {path.name} holds random operators {ops}"
    return ""


def _nodes(model: Any) -> Iterator[Any]:
    graphs = [model.graph]
    for function in model.functions:
        yield from function.node
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            yield node
            for attribute in node.attribute:
                if attribute.HasField("g"):
                    graphs.append(attribute.g)
                graphs.extend(attribute.graphs)


StepModel = tuple[ModelSpec, Path | None, Any]
"""A step model as the manager serves it: its spec, its version folder (None for an
ensemble) and its config (for an ensemble, its steps)."""


def check_ensemble(
    spec: ModelSpec, config: Any, resolve: Callable[[str, str], StepModel]
) -> None:
    """Refuse `response_cache` on an ensemble that calls (directly or through nested
    ensembles) a model whose answers change between calls. Cycles were refused before."""
    if not spec.response_cache:
        return
    pending = [config]
    while pending:
        for step in pending.pop().ensemble_scheduling.step:
            version = str(step.model_version) if step.model_version > 0 else ""
            step_spec, version_dir, step_config = resolve(step.model_name, version)
            if version_dir is None:
                pending.append(step_config)
                continue
            reason = nondeterminism(step_spec, version_dir)
            if reason:
                raise ConfigError(
                    f"model '{spec.name}': response_cache.enable is true, but its step model "
                    f"'{step.model_name}' is not deterministic: {reason}, expected "
                    "deterministic steps (or response_cache.enable false)"
                )
