"""`tachyon bench tune`: the model config with the best throughput under a p99 latency budget
(what Triton's Model Analyzer does), measured against a real `tachyon serve`.

    tachyon bench tune --repository REPO --model NAME --p99-ms 20 [--concurrency 8]
        [--max-batch-size 1,8,32,64] [--max-queue-delay-us 0,500,2000] [--instances 1,2]
        [--threads 1,2] [--search brute|quick] [--max-trials N] [--duration-s 3]
        [--output FILE] [--out DIR]

The model is copied into a scratch repository (its version folders linked, never changed);
one `tachyon serve --model-control-mode explicit` runs there, and each trial writes a candidate
config.pbtxt, reloads the model through the repository API, and measures a closed loop at
`--concurrency` with the benchmark's own load generator. The best trial (highest infer/s among
those with p99 <= budget and no errors) is written as the model's next version in REPO (a copy
of the latest version's files and the tuned config.pbtxt, which a polling server loads), or
only to --output. The report folder holds report.md, trials.json, a throughput-vs-p99 plot and
the best config.
"""

from __future__ import annotations

import contextlib
import itertools
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import text_format

from server import model_config
from server.bench import servers
from server.bench.errors import BenchError
from server.bench.runner import prepare, run_points
from server.bench.scenario import Scenario

THREAD_KEYS = {"onnxruntime": "intra_op_thread_count", "faiss": "omp_threads"}
LOAD_TIMEOUT_S = 120.0


@dataclass(frozen=True, slots=True)
class TrialConfig:
    """One point of the search space; threads None: the backend has no thread setting."""

    max_batch_size: int
    delay_us: int
    instances: int
    threads: int | None

    @property
    def label(self) -> str:
        threads = "" if self.threads is None else f" t{self.threads}"
        return f"b{self.max_batch_size} d{self.delay_us} i{self.instances}{threads}"


@dataclass(frozen=True, slots=True)
class Trial:
    config: TrialConfig
    throughput: float = 0.0  # infer/s
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    errors: int = 0
    failure: str = ""  # the config did not load, or the load failed
    baseline: bool = False  # the model's own config, measured as it is

    def within(self, budget_ms: float) -> bool:
        return not self.failure and self.errors == 0 and self.p99_ms <= budget_ms


@dataclass(frozen=True, slots=True)
class Space:
    max_batch_size: tuple[int, ...] = (1, 8, 32, 64)
    delay_us: tuple[int, ...] = (0, 500, 2000)
    instances: tuple[int, ...] = (1, 2)
    threads: tuple[int | None, ...] = (1, 2)

    @property
    def axes(self) -> tuple[tuple[Any, ...], ...]:
        return (self.max_batch_size, self.delay_us, self.instances, self.threads)

    def at(self, position: Sequence[int]) -> TrialConfig:
        return TrialConfig(*(axis[i] for axis, i in zip(self.axes, position, strict=True)))

    def size(self) -> int:
        size = 1
        for axis in self.axes:
            size *= len(axis)
        return size


def best(trials: Sequence[Trial], budget_ms: float) -> Trial | None:
    """The highest throughput among trials within the budget (ties: the lower p99)."""
    ok = [t for t in trials if t.within(budget_ms)]
    return max(ok, key=lambda t: (t.throughput, -t.p99_ms)) if ok else None


# -- search ---------------------------------------------------------------------------------

Measure = Callable[[TrialConfig], Trial]


def brute(space: Space, measure: Measure, max_trials: int) -> list[Trial]:
    """The cross product, smallest settings first, up to `max_trials`."""
    positions = itertools.product(*(range(len(axis)) for axis in space.axes))
    return [measure(space.at(p)) for p in itertools.islice(positions, max_trials)]


def _score(trial: Trial, budget_ms: float) -> tuple[int, float]:
    """Within the budget ranks by throughput; over it, by how close p99 comes; failed last."""
    if trial.failure or trial.errors:
        return (0, 0.0)
    if trial.p99_ms <= budget_ms:
        return (2, trial.throughput)
    return (1, -trial.p99_ms)


def quick(space: Space, measure: Measure, max_trials: int, budget_ms: float) -> list[Trial]:
    """Hill climbing (Model Analyzer's quick search): from the smallest settings, measure every
    neighbour one step along one axis and move to the best while it scores higher."""
    trials: dict[tuple[int, ...], Trial] = {}

    def run(position: tuple[int, ...]) -> Trial:
        if position not in trials:
            trials[position] = measure(space.at(position))
        return trials[position]

    current = tuple(0 for _ in space.axes)
    run(current)
    while len(trials) < max_trials:
        neighbours = []
        for axis, values in enumerate(space.axes):
            for step in (-1, 1):
                moved = current[axis] + step
                if 0 <= moved < len(values):
                    neighbours.append((*current[:axis], moved, *current[axis + 1 :]))
        if not neighbours:  # a space of one point
            break
        fresh = [n for n in neighbours if n not in trials][: max_trials - len(trials)]
        for position in fresh:
            run(position)
        top = max(neighbours, key=lambda n: _score(trials[n], budget_ms) if n in trials
                  else (-1, 0.0))
        if top not in trials or _score(trials[top], budget_ms) <= _score(trials[current],
                                                                          budget_ms):
            break
        current = top
    return list(trials.values())


# -- configs --------------------------------------------------------------------------------


def base_config(model_dir: Path) -> tuple[Any, str]:
    """The model's config (an empty one named for it when it has none) and its backend."""
    from server import model_versions

    versions = model_versions.versions(model_dir)
    if not versions:
        raise BenchError(f"model '{model_dir.name}' has no version folders in {model_dir}")
    try:
        config = model_config.read_config(model_dir)
        if config is None:
            config = model_config.parse_config("", model_dir.name)
        backend = model_config.backend_of(config, model_dir / str(versions[-1]))
    except model_config.ConfigError as exc:
        raise BenchError(str(exc)) from None
    if backend == "ensemble":
        raise BenchError(f"model '{model_dir.name}' is an ensemble, expected a model with its "
                         "own batcher (tune its steps one by one)")
    if config.max_batch_size == 0 and len(config.input):
        raise BenchError(f"model '{model_dir.name}' has max_batch_size 0 with full-shape dims "
                         "in its config, expected a batching model (max_batch_size > 0)")
    return config, backend


def candidate(base: Any, backend: str, trial: TrialConfig) -> Any:
    """`base` with the trial's batching, instance count and thread settings."""
    from server import proto

    config = proto.ModelConfig()
    config.CopyFrom(base)
    config.max_batch_size = trial.max_batch_size
    config.dynamic_batching.max_queue_delay_microseconds = trial.delay_us
    if not len(config.instance_group):
        config.instance_group.add()
    for group in config.instance_group[1:]:
        config.instance_group.remove(group)
    config.instance_group[0].count = trial.instances
    if trial.threads is not None:
        config.parameters[THREAD_KEYS[backend]].string_value = str(trial.threads)
    return config


def current(base: Any, backend: str) -> TrialConfig:
    """The settings the model's own config has (threads None when it sets none)."""
    key = THREAD_KEYS.get(backend, "")
    threads = base.parameters[key].string_value if key in base.parameters else ""
    count = sum(g.count or 1 for g in base.instance_group) if len(base.instance_group) else 1
    return TrialConfig(base.max_batch_size, base.dynamic_batching.max_queue_delay_microseconds,
                       count, int(threads) if threads.isdigit() else None)


def scratch_repository(model_dir: Path, folder: Path) -> Path:
    """`folder/<model>/` with the model's version folders linked (read, never written)."""
    target = folder / model_dir.name
    target.mkdir(parents=True)
    for child in model_dir.iterdir():
        if child.is_dir() and child.name.isdigit():
            (target / child.name).symlink_to(child.resolve(), target_is_directory=True)
        elif child.is_file() and child.name != model_config.CONFIG_FILE:
            (target / child.name).symlink_to(child.resolve())  # labels files and the like
    return target


def reload(http_url: str, model: str) -> str:
    """Ask the server to (re)load the model; '' when it loaded, else the server's reason."""
    request = urllib.request.Request(f"http://{http_url}/v2/repository/models/{model}/load",
                                     data=b"{}", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=LOAD_TIMEOUT_S):
            return ""
    except urllib.error.HTTPError as exc:
        return exc.read().decode(errors="replace")[:500] or f"HTTP {exc.code}"
    except OSError as exc:
        raise BenchError(f"the server at {http_url} stopped answering: {exc}") from None


# -- trials ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Load:
    """What each trial sends."""

    concurrency: int
    duration_s: float
    warmup_s: float
    protocol: str = "grpc"
    shape: tuple[tuple[str, tuple[int, ...]], ...] = ()
    input_data: Path | None = None


class TrialRunner:
    """A `tachyon serve` on a scratch copy of the model, measured one config at a time."""

    def __init__(self, model_dir: Path, base: Any, backend: str, load: Load,
                 server_args: Sequence[str], log_dir: Path) -> None:
        self._model_dir = model_dir
        self._model = model_dir.name
        self._base = base
        self._backend = backend
        self._load = load
        self._server_args = list(server_args)
        self._log_dir = log_dir
        self._stack = contextlib.ExitStack()
        self._config_path = Path()
        self._server: servers.ManagedServer | None = None

    def __enter__(self) -> TrialRunner:
        try:
            scratch = Path(self._stack.enter_context(tempfile.TemporaryDirectory(
                prefix="tachyon-tune-")))
            self._config_path = scratch_repository(self._model_dir, scratch) \
                / model_config.CONFIG_FILE
            self._write(self._base)
            server = servers.tachyon(
                scratch, ["--model-control-mode", "explicit", "--load-model", self._model,
                          *self._server_args], [self._model], self._log_dir / "server.log")
            self._server = self._stack.enter_context(server)
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _write(self, config: Any) -> None:
        self._config_path.write_text(text_format.MessageToString(config), encoding="utf-8")

    def measure(self, trial: TrialConfig, as_is: bool = False) -> Trial:
        """One trial: the base config with the trial's settings (`as_is`: the base config
        unchanged, which `trial` then describes), reloaded and measured."""
        assert self._server is not None
        self._write(self._base if as_is else candidate(self._base, self._backend, trial))
        failure = reload(self._server.url("http"), self._model)
        if failure:
            return Trial(trial, failure=failure)
        load = self._load
        scenario = Scenario(name=f"tune-{self._model}", model=self._model,
                            protocol=load.protocol, concurrency=(load.concurrency,),
                            duration=load.duration_s, warmup=load.warmup_s,
                            shape=dict(load.shape), input_data=load.input_data)
        try:
            control, target = prepare(scenario, self._server.url(load.protocol))
            try:
                (result,) = run_points(target, control, progress=False)
            finally:
                control.close()
        except BenchError as exc:
            return Trial(trial, failure=str(exc))
        return Trial(trial, result.throughput, result.latency_ms(50), result.latency_ms(99),
                     result.error_count)


def threads_axis(backend: str, values: tuple[int, ...]) -> tuple[int | None, ...]:
    """The thread counts to try, or (None,) for a backend without a thread setting."""
    return values if backend in THREAD_KEYS else (None,)
