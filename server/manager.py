"""Model lifecycle: which versions exist, their readiness, loading, reloading and unloading.

One enum (`ModelState`) and one owner (`ModelManager`) change a version's readiness, always on
the event loop thread, so a switch from an old version to a new one is atomic for requests.
Loading (reading files, creating sessions, warmup) runs on loader threads, never on the loop.

Load before unload: a new version, or a version whose config or files changed, is loaded and
warmed while the old one keeps serving; the table then points at the new one, and the old one
is unloaded after its in-flight requests are answered. A failed load leaves the old one serving
and records the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import enum
import hashlib
import logging
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server import model_config, repository
from server.backends import Backend, factory
from server.batching import DynamicBatcher, Scheduler
from server.config import ServerSettings
from server.errors import ServingError, invalid, not_found, unavailable
from server.metrics import Metrics
from server.model_config import ConfigError, ModelSpec
from server.pipeline import EnsembleScheduler, check_cycles, step_models, steps_of
from server.statistics import ModelStats
from server.warmup import warm_up

log = logging.getLogger(__name__)


class ModelState(enum.Enum):
    UNKNOWN = "UNKNOWN"
    READY = "READY"
    UNAVAILABLE = "UNAVAILABLE"
    LOADING = "LOADING"
    UNLOADING = "UNLOADING"


@dataclass(eq=False)
class ModelVersion:
    """One loaded (or failed) version of one model, and everything that serves it."""

    name: str
    version: int  # 0: the model as a whole (a config error, no version folders)
    state: ModelState = ModelState.UNKNOWN
    reason: str = ""
    config: Any = None  # the completed protobuf ModelConfig
    spec: ModelSpec | None = None
    backends: list[Backend] = field(default_factory=list)
    batcher: Scheduler | None = None  # the model's batcher, or an ensemble's scheduler
    stats: ModelStats = field(default_factory=ModelStats)
    fingerprint: str = ""  # config + files; a change triggers a reload
    failed_fingerprint: str = ""  # the last reload attempt that failed, not retried as is

    @property
    def ready(self) -> bool:
        return self.state is ModelState.READY


@dataclass(frozen=True, slots=True)
class ModelSource:
    """Where a model's files are: its folder, and an optional config that replaces its
    config.pbtxt (RepositoryModelLoad's `config` parameter)."""

    directory: Path
    config_text: str | None = None  # protobuf text format
    config_json: str | None = None  # JSON, as Triton's load API takes it


def check_name(name: str, what: str = "model name") -> None:
    """Refuse names that would leave the repository."""
    if (
        not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or "\x00" in name
        or name.startswith(".")
    ):
        raise invalid(f"{what} '{name}' is not allowed: expected a plain folder name")


def _trim_heap() -> None:
    """Give freed memory back to the OS after an unload (glibc keeps it otherwise)."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class ModelManager:
    def __init__(self, settings: ServerSettings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self._models: dict[str, dict[int, ModelVersion]] = {}
        # the version a request without a version goes to, refreshed on every state change
        self._default: dict[str, ModelVersion] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._overrides: dict[str, ModelSource] = {}
        self._loader = ThreadPoolExecutor(
            settings.model_load_threads, thread_name_prefix="model-load"
        )
        self._poller: asyncio.Task[None] | None = None
        self._scratch: list[Path] = []

    # -- queries (event loop) -----------------------------------------------------------

    def get(self, name: str, version: str = "") -> ModelVersion:
        """The version that serves `name` (highest READY by default) or a ServingError.
        "-1" means the default too, as in Triton's ensemble steps (perf_analyzer sends it)."""
        if version == "-1":
            version = ""
        if not version:
            default = self._default.get(name)
            if default is not None and default.ready:
                return default
        versions = self._models.get(name)
        if not versions:
            raise not_found(f"model '{name}' is not in the repository")
        if version:
            if not version.isdigit():
                raise not_found(
                    f"model '{name}': version '{version}' is not a version number, "
                    "expected a positive integer"
                )
            entry = versions.get(int(version))
            if entry is None:
                raise not_found(
                    f"model '{name}' has no version {version}, available: "
                    f"{sorted(v for v in versions if v)}"
                )
            if not entry.ready:
                raise unavailable(
                    f"model '{name}' version {version} is {entry.state.value}: {entry.reason}"
                )
            return entry
        ready = [v for v in versions.values() if v.ready]
        if not ready:
            reasons = "; ".join(v.reason for v in versions.values() if v.reason)
            raise unavailable(f"model '{name}' has no ready version: {reasons or 'not loaded'}")
        default = self._default[name] = max(ready, key=lambda v: v.version)
        return default

    def is_ready(self, name: str, version: str = "") -> bool:
        try:
            self.get(name, version)
        except ServingError:
            return False
        return True

    def entries(self) -> list[ModelVersion]:
        return [
            table[v] for name, table in sorted(self._models.items()) for v in sorted(table)
        ]

    def find_config(self, name: str, version: str = "") -> Any:
        """The config of a version for the ModelConfig RPC."""
        return self.get(name, version).config

    # -- control modes --------------------------------------------------------------------

    async def start(self) -> None:
        """Load what the control mode says to load at start."""
        mode = self.settings.model_control_mode
        dirs = repository.model_dirs(self.settings.model_repository)
        if mode == "explicit":
            wanted = self.settings.load_models
            names = list(dirs) if "*" in wanted else [n for n in wanted if n in dirs]
            for missing in set(wanted) - set(dirs) - {"*"}:
                self._set_failed(missing, 0, f"model '{missing}' is not in the repository")
        else:
            names = list(dirs)
        await self._reconcile_all(names)
        if mode == "poll":
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.settings.repository_poll_secs)
            try:
                await self.poll_once()
            except Exception:  # a bad scan must not stop polling
                log.exception("repository poll failed")

    async def poll_once(self) -> None:
        """Bring the served models in line with the repository on disk."""
        dirs = repository.model_dirs(self.settings.model_repository)
        gone = [name for name in self._models if name not in dirs]
        await asyncio.gather(*(self.unload(name) for name in gone))
        await self._reconcile_all(list(dirs))

    async def _reconcile_all(self, names: list[str]) -> None:
        """Models first, then the ensembles that call them."""
        ensembles = [n for n in names if self._ensemble_config(n) is not None]
        await asyncio.gather(*(self.reconcile(n) for n in names if n not in ensembles))
        await asyncio.gather(*(self.reconcile(n) for n in ensembles))

    def _ensemble_config(self, name: str) -> Any | None:
        """The parsed config of `name` when it is an ensemble, else None."""
        try:
            config = self._read_config(name, self._source(name))
        except (ConfigError, OSError):
            return None
        return config if config.platform == "ensemble" else None

    async def load(
        self,
        name: str,
        config_json: str | None = None,
        files: dict[str, bytes] | None = None,
    ) -> None:
        """RepositoryModelLoad: (re)load a model, optionally with an overriding config and
        model files carried in the request (`file:<version>/<name>`)."""
        check_name(name)
        if self.settings.model_control_mode != "explicit":
            raise unavailable(
                f"loading model '{name}' needs --model-control-mode explicit (now "
                f"'{self.settings.model_control_mode}')"
            )
        if files:
            if config_json is None:
                raise invalid(
                    f"model '{name}': file: parameters need the 'config' parameter as well"
                )
            directory = self._write_files(name, files)
            self._overrides[name] = ModelSource(directory, config_json=config_json)
        elif config_json is not None:
            directory = self.settings.model_repository / name
            self._overrides[name] = ModelSource(directory, config_json=config_json)
        else:
            self._overrides.pop(name, None)
        source = self._source(name)
        if not source.directory.is_dir():
            raise not_found(f"model '{name}' is not in the repository")
        ensemble = self._ensemble_config(name)
        if ensemble is not None:  # load the models it calls first, as Triton does
            for step in step_models(ensemble):
                if step != name and not self.is_ready(step):
                    check_name(step)
                    await self.reconcile(step, retry=True)
        failures = await self.reconcile(name, retry=True)
        if failures:
            raise invalid(f"failed to load model '{name}': {'; '.join(failures)}")

    async def unload_request(self, name: str) -> None:
        """RepositoryModelUnload."""
        check_name(name)
        if self.settings.model_control_mode != "explicit":
            raise unavailable(
                f"unloading model '{name}' needs --model-control-mode explicit (now "
                f"'{self.settings.model_control_mode}')"
            )
        if name not in self._models:
            raise not_found(f"model '{name}' is not loaded")
        self._overrides.pop(name, None)
        await self.unload(name)

    def _write_files(self, name: str, files: dict[str, bytes]) -> Path:
        directory = Path(tempfile.mkdtemp(prefix=f"tachyon-{name}-"))
        self._scratch.append(directory)
        for key, content in files.items():
            relative = Path(key)
            parts = relative.parts
            if (
                relative.is_absolute()
                or len(parts) < 2
                or not parts[0].isdigit()
                or any(p in ("..", ".", "") or "\\" in p for p in parts)
            ):
                raise invalid(
                    f"parameter 'file:{key}' is not allowed: expected file:<version>/<name> "
                    "inside the model folder"
                )
            target = directory / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
        return directory

    def _source(self, name: str) -> ModelSource:
        return self._overrides.get(name) or ModelSource(self.settings.model_repository / name)

    # -- reconcile: the one place that loads, swaps and unloads ---------------------------

    def _lock(self, name: str) -> asyncio.Lock:
        lock = self._locks.get(name)
        if lock is None:
            lock = self._locks[name] = asyncio.Lock()
        return lock

    async def reconcile(self, name: str, retry: bool = False) -> list[str]:
        """Load the versions the model's policy selects, reload changed ones, unload the
        rest; load before unload throughout. Failed loads are retried when their files or
        config change, or when `retry` is set (an explicit load request). Returns the reasons
        of the loads that failed in this pass."""
        async with self._lock(name):
            return await self._reconcile(name, retry)

    async def _reconcile(self, name: str, retry: bool) -> list[str]:
        source = self._source(name)
        table = self._models.setdefault(name, {})
        try:
            config = self._read_config(name, source)
            on_disk = repository.version_dirs(source.directory)
            if not on_disk:
                raise ConfigError(f"model '{name}': no version folders (1/, 2/, ...) found")
            selected = repository.select_versions(config, list(on_disk))
        except (ConfigError, OSError) as exc:
            self._model_error(name, str(exc))
            return [str(exc)]
        if 0 in table and not table[0].ready:
            del table[0]  # the model-level error is fixed
        config_text = str(config)
        loads = []
        for version in selected:
            fingerprint = _fingerprint(config_text, on_disk[version])
            current = table.get(version)
            if current is not None and (
                (current.ready and current.fingerprint == fingerprint)
                or (not retry and fingerprint in (current.fingerprint, current.failed_fingerprint))
            ):
                continue  # unchanged, or failed before as it is now
            loads.append(self._load_version(name, version, config, on_disk[version], fingerprint))
        failures = [f for f in await asyncio.gather(*loads) if f]
        for version in [v for v in table if v and v not in selected]:
            await self._retire(table[version], "unloaded: not selected by version_policy")
        return failures

    def _read_config(self, name: str, source: ModelSource) -> Any:
        if source.config_json is not None:
            config = model_config.parse_config_json(source.config_json, name)
        else:
            config = model_config.read_config(source.directory)
            if config is None:
                config = model_config.parse_config("", name)
        if config.name != name:
            raise ConfigError(
                f"model '{name}': config name '{config.name}' does not match the folder "
                f"name '{name}'"
            )
        return config

    def _model_error(self, name: str, reason: str) -> None:
        """A model-level error (config, folders): served versions keep serving."""
        log.error("model '%s': %s", name, reason)
        table = self._models.setdefault(name, {})
        table[0] = ModelVersion(name, 0, ModelState.UNAVAILABLE, reason)

    def _set_failed(self, name: str, version: int, reason: str) -> None:
        log.error("model '%s' is unavailable: %s", name, reason)
        self._models.setdefault(name, {})[version] = ModelVersion(
            name, version, ModelState.UNAVAILABLE, reason
        )

    async def _load_version(
        self, name: str, version: int, base_config: Any, path: Path, fingerprint: str
    ) -> str | None:
        """Load one version (load before unload); returns the failure reason, if any."""
        table = self._models.setdefault(name, {})
        old = table.get(version)
        if old is None or not old.ready:
            table[version] = ModelVersion(name, version, ModelState.LOADING)
        loop = asyncio.get_running_loop()
        ensemble: EnsembleScheduler | None = None
        backends: list[Backend] = []
        try:
            if base_config.platform == "ensemble":
                ensemble = self._load_ensemble(base_config)
                config, spec = base_config, ensemble.spec
            else:
                config, spec, backends = await loop.run_in_executor(
                    self._loader, self._load_files, base_config, path
                )
        except Exception as exc:
            reason = str(exc) or type(exc).__name__
            if old is not None and old.ready:
                old.reason = f"reload failed, still serving the previous load: {reason}"
                old.failed_fingerprint = fingerprint
                log.error("model '%s' version %d: reload failed: %s", name, version, reason)
                return f"version {version}: {old.reason}"
            table[version] = ModelVersion(
                name, version, ModelState.UNAVAILABLE, reason, fingerprint=fingerprint
            )
            log.error("model '%s' version %d is unavailable: %s", name, version, reason)
            return f"version {version}: {reason}"
        entry = ModelVersion(
            name, version, ModelState.READY, "", config, spec, backends, fingerprint=fingerprint
        )
        if self.metrics is not None:
            entry.stats.metrics = self.metrics.version(name, version)
        if ensemble is not None:
            entry.batcher = ensemble
        else:
            batcher = DynamicBatcher(spec, backends, entry.stats)
            batcher.start()
            entry.batcher = batcher
        table[version] = entry  # the switch: new requests go to the new load from here on
        self._default.pop(name, None)
        log.info("model '%s' version %d is READY", name, version)
        if old is not None and old.ready:
            await self._unload_entry(old)
        return None

    def _load_ensemble(self, config: Any) -> EnsembleScheduler:
        """Event loop: an ensemble checks its steps against the models serving now."""
        spec = model_config.to_spec(config, "ensemble")
        if not config.HasField("version_policy"):
            config.version_policy.latest.num_versions = 1
        own = config.name
        check_cycles(own, lambda n: config if n == own else self._ensemble_config(n))

        def step_spec(model: str, version: str) -> ModelSpec:
            entry = self.get(model, version)
            assert entry.spec is not None
            return entry.spec

        def step_scheduler(model: str, version: str) -> Scheduler:
            entry = self.get(model, version)
            assert entry.batcher is not None
            return entry.batcher

        return EnsembleScheduler(spec, steps_of(config), step_spec, step_scheduler)

    def _load_files(self, base_config: Any, path: Path) -> tuple[Any, ModelSpec, list[Backend]]:
        """Loader thread: complete and validate the config, load and warm the instances."""
        config = type(base_config)()
        config.CopyFrom(base_config)
        backend_name = model_config.backend_of(config, path)
        backend_class = factory(backend_name)
        if not model_config.is_complete(config):
            if self.settings.strict_model_config:
                raise ConfigError(
                    f"model '{config.name}': config.pbtxt must list inputs and outputs "
                    "(--strict-model-config)"
                )
            backend_class.complete_config(config, path, self.settings.default_max_batch_size)
        spec = model_config.to_spec(config, backend_name)
        model_config.fill_defaults(config, backend_name)
        model_file = path / spec.model_filename
        if spec.model_filename and not model_file.exists():
            raise ConfigError(f"model '{config.name}': model file {model_file} does not exist")
        backends = [backend_class(spec, path, i) for i in range(spec.instance_count)]
        try:
            for backend in backends:
                backend.load()
                warm_up(backend, config, path.parent)
        except BaseException:
            for backend in backends:
                backend.unload()
            raise
        return config, spec, backends

    async def _retire(self, entry: ModelVersion, reason: str) -> None:
        """Unload a version and keep it in the index as UNAVAILABLE with the reason."""
        await self._unload_entry(entry)
        table = self._models.get(entry.name, {})
        if table.get(entry.version) is entry:
            entry.state, entry.reason = ModelState.UNAVAILABLE, reason

    async def _unload_entry(self, entry: ModelVersion) -> None:
        """Answer the version's admitted requests, then release it."""
        entry.state = ModelState.UNLOADING
        self._default.pop(entry.name, None)
        if entry.batcher is not None:
            await entry.batcher.drain()
        backends, entry.backends = entry.backends, []
        if backends:
            await asyncio.get_running_loop().run_in_executor(self._loader, _unload_all, backends)
        entry.batcher = None
        entry.state = ModelState.UNAVAILABLE

    async def unload(self, name: str) -> None:
        async with self._lock(name):
            for entry in list(self._models.get(name, {}).values()):
                if entry.version == 0:
                    self._models[name].pop(0, None)
                    continue
                await self._retire(entry, "unloaded")

    async def shutdown(self) -> None:
        """Answer everything admitted, then unload every version."""
        if self._poller is not None:
            self._poller.cancel()
        for entry in self.entries():
            if entry.backends or entry.batcher is not None:
                await self._unload_entry(entry)
        self._loader.shutdown(wait=False)
        for directory in self._scratch:
            shutil.rmtree(directory, ignore_errors=True)


def _unload_all(backends: list[Backend]) -> None:
    for backend in backends:
        backend.unload()
    _trim_heap()


def _fingerprint(config_text: str, version_dir: Path) -> str:
    """Changes when the config or any file of the version folder changes."""
    digest = hashlib.sha1(config_text.encode(), usedforsecurity=False)
    for path in sorted(version_dir.rglob("*")):
        if path.is_file():
            stat = path.stat()
            key = f"{path.relative_to(version_dir)}:{stat.st_size}:{stat.st_mtime_ns}"
            digest.update(key.encode())
    return digest.hexdigest()
