"""Ensemble scheduling (`platform: "ensemble"`, Triton's `ensemble_scheduling`).

An ensemble is a scheduler, not a backend: it routes each step to the step model's own batcher,
passing tensors between steps in-process (numpy arrays, no copies, no network). A step runs as
soon as every tensor it needs exists, so independent steps run concurrently. Configs are
checked at load: unknown models, cycles, unmapped tensors, datatype and shape mismatches.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from server.backends.base import Options
from server.errors import ServingError, invalid, unavailable
from server.model_config import ConfigError, ModelSpec
from server.tracing import RequestTrace
from server.types import Array, TensorSpec

Outputs = dict[str, Array]


@dataclass(frozen=True, slots=True)
class Step:
    model_name: str
    model_version: str  # "" : the model's default version
    input_map: dict[str, str]  # step model input -> ensemble tensor
    output_map: dict[str, str]  # step model output -> ensemble tensor


def steps_of(config: Any) -> list[Step]:
    steps = []
    for index, step in enumerate(config.ensemble_scheduling.step):
        if not step.model_name:
            raise ConfigError(
                f"model '{config.name}': ensemble_scheduling.step[{index}] has no model_name"
            )
        version = int(step.model_version)
        steps.append(Step(
            step.model_name,
            str(version) if version > 0 else "",
            dict(step.input_map),
            dict(step.output_map),
        ))
    if not steps:
        raise ConfigError(f"model '{config.name}': ensemble_scheduling has no steps")
    return steps


def step_models(config: Any) -> list[str]:
    """The models an ensemble config calls, in step order (for loading dependencies)."""
    return [s.model_name for s in config.ensemble_scheduling.step]


def check_cycles(name: str, configs: Callable[[str], Any | None]) -> None:
    """Refuse an ensemble that (through other ensembles) calls itself. `configs(name)`
    returns a model's parsed config, or None when it is not an ensemble."""
    def visit(model: str, path: list[str]) -> None:
        config = configs(model)
        if config is None:
            return
        for child in step_models(config):
            if child in path:
                cycle = " -> ".join([*path, child])
                raise ConfigError(f"model '{name}': ensemble steps form a cycle: {cycle}")
            visit(child, [*path, child])

    visit(name, [name])


def _compatible(a: TensorSpec, a_batch: int, b: TensorSpec, b_batch: int) -> bool:
    if a.datatype is not b.datatype:
        return False
    a_dims, b_dims = a.full_shape(a_batch), b.full_shape(b_batch)
    if len(a_dims) != len(b_dims):
        return False
    return all(x == -1 or y == -1 or x == y for x, y in zip(a_dims, b_dims, strict=True))


class EnsembleScheduler:
    """Runs one ensemble's steps per request. `resolve(model, version)` returns the step
    model's current (spec, submit) and raises ServingError when it cannot serve."""

    def __init__(
        self,
        spec: ModelSpec,
        steps: list[Step],
        specs: Callable[[str, str], ModelSpec],
        resolve: Callable[[str, str], Any],
    ) -> None:
        self.spec = spec
        self.steps = steps
        self._resolve = resolve
        self._closed = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._validate(specs)

    # -- load-time checks -------------------------------------------------------------------

    def _validate(self, specs: Callable[[str, str], ModelSpec]) -> None:
        name = self.spec.name
        batch = self.spec.max_batch_size
        known: dict[str, tuple[TensorSpec, int]] = {t.name: (t, batch) for t in self.spec.inputs}
        pending = list(enumerate(self.steps))
        order: list[Step] = []
        while pending:
            ready = [(i, s) for i, s in pending if set(s.input_map.values()) <= set(known)]
            if not ready:
                i, step = pending[0]
                missing = sorted(set(step.input_map.values()) - set(known))
                raise ConfigError(
                    f"model '{name}': step[{i}] ('{step.model_name}') reads {missing}, which no "
                    "ensemble input or earlier step output provides"
                )
            for i, step in ready:
                self._check_step(i, step, specs, known)
                order.append(step)
                pending.remove((i, step))
        for output in self.spec.outputs:
            if output.name not in known:
                raise ConfigError(
                    f"model '{name}': output '{output.name}' is produced by no step's output_map"
                )
            produced, produced_batch = known[output.name]
            if not _compatible(produced, produced_batch, output, batch):
                raise ConfigError(
                    f"model '{name}': output '{output.name}' is {output.datatype.value} "
                    f"{list(output.full_shape(batch))}, but its step produces "
                    f"{produced.datatype.value} {list(produced.full_shape(produced_batch))}"
                )
        self.steps = order

    def _check_step(
        self,
        index: int,
        step: Step,
        specs: Callable[[str, str], ModelSpec],
        known: dict[str, tuple[TensorSpec, int]],
    ) -> None:
        where = f"model '{self.spec.name}': step[{index}] ('{step.model_name}')"
        try:
            model = specs(step.model_name, step.model_version)
        except ServingError as exc:
            raise ConfigError(f"{where}: {exc.message}") from None
        if self.spec.max_batch_size and model.max_batch_size < self.spec.max_batch_size:
            raise ConfigError(
                f"{where}: max_batch_size {model.max_batch_size} is smaller than the "
                f"ensemble's {self.spec.max_batch_size}"
            )
        for step_input, tensor in step.input_map.items():
            target = model.input(step_input)
            if target is None:
                raise ConfigError(
                    f"{where}: input_map names input '{step_input}', expected one of "
                    f"{[t.name for t in model.inputs]}"
                )
            source, source_batch = known[tensor]
            if not _compatible(source, source_batch, target, model.max_batch_size):
                raise ConfigError(
                    f"{where}: input '{step_input}' is {target.datatype.value} "
                    f"{list(target.full_shape(model.max_batch_size))}, but tensor '{tensor}' is "
                    f"{source.datatype.value} {list(source.full_shape(source_batch))}"
                )
        missing = [t.name for t in model.inputs if t.name not in step.input_map and not t.optional]
        if missing:
            raise ConfigError(f"{where}: input_map leaves inputs {missing} unmapped")
        for step_output, tensor in step.output_map.items():
            produced = model.output(step_output)
            if produced is None:
                raise ConfigError(
                    f"{where}: output_map names output '{step_output}', expected one of "
                    f"{[t.name for t in model.outputs]}"
                )
            if tensor in known:
                raise ConfigError(f"{where}: tensor '{tensor}' is written twice")
            known[tensor] = (
                TensorSpec(tensor, produced.datatype, produced.dims), model.max_batch_size
            )

    # -- the scheduler interface (what the data plane calls) --------------------------------

    def check_parameters(self, priority: object, timeout_us: object) -> tuple[int, int]:
        if priority is not None and (not isinstance(priority, int) or priority < 0):
            raise invalid(f"parameter 'priority' is {priority!r}, expected an integer >= 0")
        if timeout_us is not None and (not isinstance(timeout_us, int) or timeout_us < 0):
            raise invalid(f"parameter 'timeout' is {timeout_us!r}, expected microseconds >= 0")
        return int(priority or 0), int(timeout_us or 0)

    @property
    def pending(self) -> int:
        return self._in_flight

    async def submit(
        self, inputs: dict[str, Array], outputs: list[str], rows: int, level: int = 0,
        timeout_us: int = 0, options: Options = (), trace: RequestTrace | None = None,
    ) -> Outputs:
        """`options` (per-request backend settings) do not pass through an ensemble; a traced
        request's trace does, so each step's queue and compute times are recorded."""
        if self._closed:
            raise unavailable(f"model '{self.spec.name}' is unloading, retry")
        self._in_flight += 1
        self._idle.clear()
        try:
            tensors = await self._run(dict(inputs), rows, level, timeout_us, trace)
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()
        return {name: tensors[name] for name in outputs}

    async def _run(
        self, tensors: dict[str, Array], rows: int, level: int, timeout: int,
        trace: RequestTrace | None,
    ) -> Outputs:
        remaining = list(self.steps)
        while remaining:
            ready = [s for s in remaining if set(s.input_map.values()) <= set(tensors)]
            results = await asyncio.gather(
                *(self._step(s, tensors, rows, level, timeout, trace) for s in ready)
            )
            for step, produced in zip(ready, results, strict=True):
                for step_output, tensor in step.output_map.items():
                    tensors[tensor] = produced[step_output]
                remaining.remove(step)
        return tensors

    async def _step(
        self, step: Step, tensors: dict[str, Array], rows: int, level: int, timeout: int,
        trace: RequestTrace | None,
    ) -> Outputs:
        scheduler = self._resolve(step.model_name, step.model_version)
        inputs = {name: tensors[tensor] for name, tensor in step.input_map.items()}
        step_level, step_timeout = scheduler.check_parameters(level or None, timeout or None)
        try:
            result: Outputs = await scheduler.submit(
                inputs, list(step.output_map), rows, step_level, step_timeout, trace=trace
            )
        except ServingError as exc:
            raise ServingError(
                exc.code, f"model '{self.spec.name}' step '{step.model_name}': {exc.message}"
            ) from None
        return result

    async def drain(self) -> None:
        self._closed = True
        await self._idle.wait()
