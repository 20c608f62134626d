"""Benchmark scenarios: what to load, how hard, for how long, and against which server.

A scenario is a TOML file (YAML too, when PyYAML is installed) in `benchmarks/scenarios/`:

    name = "identity_fp32_grpc_closed"      # default: the file's stem
    description = "..."
    model = "identity_fp32"                 # required
    model_version = ""                      # default: the server's choice
    protocol = "grpc"                       # grpc | http
    http_format = "binary"                  # with http: binary (tensor extension) | json
    url = "127.0.0.1:8001"                  # a running server (host:port of its grpc or http port)
    concurrency = [1, 2, 4, 8, 16, 32]      # closed loop: one point per value ...
    rate = [500, 1000, 2000]                # ... or open loop: requests/s, one point per value
    arrival = "poisson"                     # open loop: constant | poisson
    duration = 5.0                          # measured seconds per point
    warmup = 1.0                            # seconds of load before each measurement
    procs = 1                               # client processes
    input_data = "digits_data.json"         # perf_analyzer-style data file (default: random)
    repository = "../../model_repository"   # start `tachyon serve` on this repository ...
    server_args = ["--log-verbose", "0"]    # ... with these extra flags (url is then ignored)
    timeout = 30.0                          # seconds per request (default: none)
    seed = 0                                # random data and Poisson arrivals
    [shape]
    INPUT0 = [1, 16]                        # request shape; a -1 batch dimension defaults to 1

Relative paths are relative to the scenario file.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server import extras
from server.bench.errors import BenchError

PROTOCOLS = ("grpc", "http")
HTTP_FORMATS = ("binary", "json")
ARRIVALS = ("constant", "poisson")
SUFFIXES = (".toml", ".yaml", ".yml")
DEFAULT_PORTS = {"grpc": 8001, "http": 8000}


@dataclass(frozen=True, slots=True)
class Point:
    """One measurement: a closed loop at `value` concurrent requests, or an open loop at `value`
    requests per second."""

    mode: str  # "closed" | "open"
    value: float

    @property
    def label(self) -> str:
        if self.mode == "closed":
            return f"c{int(self.value)}"
        return f"{self.value:g}/s"


@dataclass(frozen=True, slots=True)
class Scenario:
    """A validated scenario (see the module docstring for each field)."""

    name: str
    model: str
    protocol: str = "grpc"
    http_format: str = "binary"
    model_version: str = ""
    url: str = ""
    concurrency: tuple[int, ...] = ()
    rate: tuple[float, ...] = ()
    arrival: str = "constant"
    duration: float = 5.0
    warmup: float = 1.0
    procs: int = 1
    shape: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    input_data: Path | None = None
    repository: Path | None = None
    server_args: tuple[str, ...] = ()
    timeout: float | None = None
    seed: int = 0
    description: str = ""
    source: Path | None = None

    @property
    def mode(self) -> str:
        return "closed" if self.concurrency else "open"

    @property
    def points(self) -> list[Point]:
        if self.concurrency:
            return [Point("closed", c) for c in self.concurrency]
        return [Point("open", r) for r in self.rate]

    @property
    def target_url(self) -> str:
        """The server to load when none is started: `url`, else 127.0.0.1 on the default port."""
        return self.url or f"127.0.0.1:{DEFAULT_PORTS[self.protocol]}"

    def replace(self, **changes: Any) -> Scenario:
        """A copy with `changes` (None values ignored), validated again."""
        changes = {k: v for k, v in changes.items() if v is not None}
        if changes.get("concurrency"):
            changes["rate"] = ()
        elif changes.get("rate"):
            changes["concurrency"] = ()
        scenario = dataclasses.replace(self, **changes)
        validate(scenario)
        return scenario

    def describe(self) -> dict[str, Any]:
        """The scenario as JSON-friendly values, for reports."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Path):
                value = str(value)
            elif isinstance(value, Mapping):
                value = {k: list(v) for k, v in value.items()}
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out


def _where(source: Path | None) -> str:
    return f"scenario {source}" if source else "scenario"


def _positive_ints(values: Any, what: str, where: str) -> tuple[int, ...]:
    if isinstance(values, int) and not isinstance(values, bool):
        values = [values]
    if not isinstance(values, list | tuple) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values
    ):
        raise BenchError(f"{where}: '{what}' must be a list of positive integers, got {values!r}")
    return tuple(values)


def _positive_floats(values: Any, what: str, where: str) -> tuple[float, ...]:
    if isinstance(values, int | float) and not isinstance(values, bool):
        values = [values]
    if not isinstance(values, list | tuple) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0
        for v in values
    ):
        raise BenchError(f"{where}: '{what}' must be a list of positive numbers, got {values!r}")
    return tuple(float(v) for v in values)


def _number(value: Any, what: str, where: str, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= minimum:
        raise BenchError(f"{where}: '{what}' must be a number >= {minimum:g}, got {value!r}")
    return float(value)


def _shapes(value: Any, where: str) -> dict[str, tuple[int, ...]]:
    if not isinstance(value, Mapping):
        raise BenchError(f"{where}: 'shape' must be a table of input name -> [dims], got {value!r}")
    shapes = {}
    for name, dims in value.items():
        shapes[str(name)] = _positive_ints(dims, f"shape.{name}", where)
    return shapes


def _choice(value: Any, what: str, choices: tuple[str, ...], where: str) -> str:
    if value not in choices:
        raise BenchError(f"{where}: '{what}' must be one of {', '.join(choices)}, got {value!r}")
    return str(value)


def from_mapping(data: Mapping[str, Any], source: Path | None = None) -> Scenario:
    """A scenario from parsed TOML/YAML; relative paths are taken from `source`'s folder."""
    where = _where(source)
    known = {f.name for f in dataclasses.fields(Scenario)} - {"source"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise BenchError(f"{where}: unknown field(s) {', '.join(unknown)}; "
                         f"known fields: {', '.join(sorted(known))}")
    if not isinstance(data.get("model"), str) or not data["model"]:
        raise BenchError(f"{where}: 'model' (the model to load) is required")
    base = source.parent if source else Path.cwd()

    def path(key: str) -> Path | None:
        value = data.get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            raise BenchError(f"{where}: '{key}' must be a path, got {value!r}")
        return (base / value).resolve()

    server_args = data.get("server_args", [])
    if not isinstance(server_args, list) or not all(isinstance(a, str) for a in server_args):
        raise BenchError(f"{where}: 'server_args' must be a list of strings, got {server_args!r}")
    timeout = data.get("timeout")
    scenario = Scenario(
        name=str(data.get("name") or (source.stem if source else data["model"])),
        model=data["model"],
        protocol=_choice(data.get("protocol", "grpc"), "protocol", PROTOCOLS, where),
        http_format=_choice(data.get("http_format", "binary"), "http_format", HTTP_FORMATS,
                            where),
        model_version=str(data.get("model_version", "")),
        url=str(data.get("url", "")),
        concurrency=_positive_ints(data.get("concurrency", []), "concurrency", where),
        rate=_positive_floats(data.get("rate", []), "rate", where),
        arrival=_choice(data.get("arrival", "constant"), "arrival", ARRIVALS, where),
        duration=_number(data.get("duration", 5.0), "duration", where, 0.1),
        warmup=_number(data.get("warmup", 1.0), "warmup", where),
        procs=int(_number(data.get("procs", 1), "procs", where, 1)),
        shape=_shapes(data.get("shape", {}), where),
        input_data=path("input_data"),
        repository=path("repository"),
        server_args=tuple(server_args),
        timeout=None if timeout is None else _number(timeout, "timeout", where, 0.001),
        seed=int(_number(data.get("seed", 0), "seed", where)),
        description=str(data.get("description", "")),
        source=source,
    )
    validate(scenario)
    return scenario


def validate(scenario: Scenario) -> None:
    """Checks that hold between fields (each field was checked when parsed)."""
    where = _where(scenario.source)
    if bool(scenario.concurrency) == bool(scenario.rate):
        raise BenchError(f"{where}: give exactly one of 'concurrency' (closed loop) and 'rate' "
                         "(open loop, requests/s)")
    if scenario.duration < 0.1:
        raise BenchError(f"{where}: 'duration' must be at least 0.1 s, got {scenario.duration}")
    if scenario.procs < 1:
        raise BenchError(f"{where}: 'procs' must be at least 1, got {scenario.procs}")
    if scenario.repository is not None and not scenario.repository.is_dir():
        raise BenchError(f"{where}: repository {scenario.repository} is not a directory")
    if scenario.input_data is not None and not scenario.input_data.is_file():
        raise BenchError(f"{where}: input data file {scenario.input_data} does not exist")
    if scenario.url and ":" not in scenario.url:
        raise BenchError(f"{where}: url must be HOST:PORT, got {scenario.url!r}")


def _parse(path: Path) -> Mapping[str, Any]:
    text = path.read_text()
    if path.suffix == ".toml":
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise BenchError(f"scenario {path} is not valid TOML: {exc}") from None
    try:
        import yaml
    except ImportError:
        raise BenchError(f"scenario {path}: YAML scenarios {extras.needs('bench')} (PyYAML); "
                         "or write it as TOML") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise BenchError(f"scenario {path} is not valid YAML: {exc}") from None
    if not isinstance(data, Mapping):
        raise BenchError(f"scenario {path} must be a mapping of fields")
    return data


def search_dirs() -> list[Path]:
    """Where a scenario given by name is looked for: ./benchmarks/scenarios, then the one beside
    this package's source checkout."""
    dirs = [Path.cwd() / "benchmarks" / "scenarios",
            Path(__file__).resolve().parents[2] / "benchmarks" / "scenarios"]
    return list(dict.fromkeys(dirs))


def find(name_or_path: str) -> Path:
    """A scenario file by path, or by name in `search_dirs()`."""
    path = Path(name_or_path)
    if path.is_file():
        return path.resolve()
    for folder in search_dirs():
        for suffix in ("", *SUFFIXES):
            candidate = folder / f"{name_or_path}{suffix}"
            if candidate.is_file():
                return candidate.resolve()
    known = sorted({p.stem for d in search_dirs() if d.is_dir() for p in d.iterdir()
                    if p.suffix in SUFFIXES})
    raise BenchError(f"scenario {name_or_path!r} not found (a file, or one of: "
                     f"{', '.join(known) or 'none'})")


def load(name_or_path: str) -> Scenario:
    """Reads, parses and validates a scenario file."""
    path = find(name_or_path)
    return from_mapping(_parse(path), path)
