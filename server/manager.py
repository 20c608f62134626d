"""Model lifecycle: which versions exist, their readiness, loading, reloading and unloading.

One enum (`ModelState`) and one owner (`ModelManager`) change a version's readiness, always on
the event loop thread, so a switch from an old version to a new one is atomic for requests.
File work never runs on the loop: repository scans (folders, configs, fingerprints) run on one
`repository-io` thread, so that a scan never waits behind a model load; loading (sessions,
warmup) and unloading run on the loader threads (`--model-load-thread-count`).

Load before unload: a new version, or a version whose config or files changed, is loaded and
warmed while the old one keeps serving; the table then points at the new one, and the old one
is unloaded after its in-flight requests are answered. A failed load leaves the old one serving
and records the reason.

A version that is unloaded on purpose (an unload request, or its version_policy no longer
selects it) is *retired*: it stays in the index as UNAVAILABLE with the reason, but it is not
meant to be served, so it does not count against readiness, and its metric series are removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import enum
import logging
import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from server import cache_policy, cached_scheduler, model_config, repository
from server.backends import Backend, factory
from server.batching import DynamicBatcher, Scheduler
from server.cache import ResponseCache
from server.config import ServerSettings
from server.errors import ServingError, invalid, not_found, unavailable
from server.metrics import Metrics
from server.model_config import ConfigError, ModelSpec
from server.pipeline import EnsembleScheduler, check_cycles, step_models, steps_of
from server.statistics import ModelStats
from server.warmup import warm_up

log = logging.getLogger(__name__)

T = TypeVar("T")
Failures = dict[str, list[str]]  # model name -> the reasons its loads failed


class ModelState(enum.Enum):
    UNKNOWN = "UNKNOWN"
    READY = "READY"
    UNAVAILABLE = "UNAVAILABLE"
    LOADING = "LOADING"
    UNLOADING = "UNLOADING"


class StartupError(RuntimeError):
    """Models failed to load at start (`--exit-on-error` makes the server exit on it)."""

    def __init__(self, failures: Failures) -> None:
        details = "; ".join(f"{name}: {' / '.join(reasons)}" for name, reasons in failures.items())
        super().__init__(
            f"{len(failures)} model(s) failed to load at start, exiting (--exit-on-error; "
            f"--exit-on-error false serves the others): {details}"
        )
        self.failures = failures


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
    labels: dict[str, tuple[str, ...]] = field(default_factory=dict)  # output -> class labels
    # unloaded on purpose (unload request, version_policy): not meant to be served
    retired: bool = False

    @property
    def ready(self) -> bool:
        return self.state is ModelState.READY

    @property
    def counts_for_readiness(self) -> bool:
        """Meant to be served and settled: not retired, and not in its first load."""
        return not self.retired and self.state is not ModelState.LOADING


@dataclass(frozen=True, slots=True)
class ModelSource:
    """Where a model's files are: its folder, and an optional config that replaces its
    config.pbtxt (RepositoryModelLoad's `config` parameter). `scratch` marks a folder of
    files carried in a load request, removed once the source is replaced or unloaded."""

    directory: Path
    config_text: str | None = None  # protobuf text format
    config_json: str | None = None  # JSON, as Triton's load API takes it
    scratch: bool = False


@dataclass(frozen=True, slots=True)
class _Scan:
    """What a reconcile reads from disk: the config and the selected versions' folders."""

    config: Any
    folders: dict[int, Path]  # the selected versions
    fingerprints: dict[int, str]


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
        # bumped whenever the versions that serve may change (a version turned READY or
        # started unloading): the native request path re-registers its models on a change
        self.generation = 0
        self._locks: dict[str, asyncio.Lock] = {}
        self._overrides: dict[str, ModelSource] = {}
        self._loader = ThreadPoolExecutor(
            settings.model_load_threads, thread_name_prefix="model-load"
        )
        self._files = ThreadPoolExecutor(1, thread_name_prefix="repository-io")
        self._poller: asyncio.Task[None] | None = None
        # --cache-config: the server-wide response cache (models opt in by config)
        self.cache = ResponseCache(settings.cache.size) if settings.cache else None

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
        if not versions:  # Triton's words, which its clients' examples look for
            raise not_found(
                f"Request for unknown model: '{name}' is not found in the model repository"
            )
        if version:
            if not version.isdigit():
                raise not_found(
                    f"model '{name}': failed to get model version from specified version "
                    f"string '{version}': expected a positive integer"
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

    def unready(self) -> list[ModelVersion]:
        """The versions meant to be served that cannot serve: failed loads and model-level
        errors. Retired versions (unloaded on purpose) and first loads still running do not
        count, so a rollout or an unload never makes the server unready."""
        return [v for v in self.entries() if v.counts_for_readiness and not v.ready]

    def find_config(self, name: str, version: str = "") -> Any:
        """The config of a version for the ModelConfig RPC."""
        return self.get(name, version).config

    async def repository_models(self) -> list[str]:
        """The model folders in the repository now (read on the repository-io thread)."""
        try:
            dirs = await self._io(repository.model_dirs, self.settings.model_repository)
        except OSError as exc:
            log.error("cannot list the model repository: %s", exc)
            return []
        return list(dirs)

    # -- control modes --------------------------------------------------------------------

    async def start(self) -> Failures:
        """Load what the control mode says to load at start; returns the models whose loads
        failed, with the reasons (`--exit-on-error` exits on any)."""
        mode = self.settings.model_control_mode
        dirs = await self._io(repository.model_dirs, self.settings.model_repository)
        failures: Failures = {}
        if mode == "explicit":
            wanted = self.settings.load_models
            names = list(dirs) if "*" in wanted else [n for n in wanted if n in dirs]
            for missing in sorted(set(wanted) - set(dirs) - {"*"}):
                reason = f"model '{missing}' is not in the repository"
                self._set_failed(missing, 0, reason)
                failures[missing] = [reason]
        else:
            names = list(dirs)
        failures.update(await self._reconcile_all(names))
        if mode == "poll":
            self._poller = asyncio.get_running_loop().create_task(self._poll())
        return failures

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.settings.repository_poll_secs)
            try:
                await self.poll_once()
            except Exception:  # a bad scan must not stop polling
                log.exception("repository poll failed")

    async def poll_once(self) -> None:
        """Bring the served models in line with the repository on disk."""
        dirs = await self._io(repository.model_dirs, self.settings.model_repository)
        gone = [
            name for name, table in self._models.items()
            if name not in dirs and any(not v.retired for v in table.values())
        ]
        await asyncio.gather(*(self.unload(name) for name in gone))
        await self._reconcile_all(list(dirs))

    async def _reconcile_all(self, names: list[str]) -> Failures:
        """Models first, then the ensembles that call them."""
        sources = [self._source(n) for n in names]
        ensembles = await self._io(_ensembles, names, sources)
        failures: Failures = {}
        for group in ([n for n in names if n not in ensembles], ensembles):
            results = await asyncio.gather(*(self.reconcile(n) for n in group))
            failures.update((n, f) for n, f in zip(group, results, strict=True) if f)
        return failures

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
        if files and config_json is None:
            raise invalid(f"model '{name}': file: parameters need the 'config' parameter as well")
        source = await self._new_source(name, config_json, files)
        try:
            if not await self._io(source.directory.is_dir):
                raise not_found(f"failed to load '{name}': it is not in the model repository")
            ensemble = await self._io(_ensemble_config, name, source)
            if ensemble is not None:  # load the models it calls first, as Triton does
                for step in step_models(ensemble):
                    if step != name and not self.is_ready(step):
                        check_name(step)
                        await self.reconcile(step, retry=True)
        except BaseException:
            await self._discard(source)
            raise
        async with self._lock(name):
            previous = self._overrides.get(name)
            self._set_source(name, source)
            try:
                failures = await self._reconcile(name, retry=True)
            finally:
                if previous is not None and previous is not source:
                    await self._discard(previous)
        if failures:
            raise invalid(f"failed to load model '{name}': {'; '.join(failures)}")

    async def _new_source(
        self, name: str, config_json: str | None, files: dict[str, bytes] | None
    ) -> ModelSource:
        if files:
            assert config_json is not None
            _check_file_keys(files)
            directory = await self._io(_write_files, name, files)
            return ModelSource(directory, config_json=config_json, scratch=True)
        return ModelSource(self.settings.model_repository / name, config_json=config_json)

    def _set_source(self, name: str, source: ModelSource) -> None:
        if source.scratch or source.config_json is not None:
            self._overrides[name] = source
        else:
            self._overrides.pop(name, None)

    async def _discard(self, source: ModelSource) -> None:
        """Remove a request's scratch folder (its versions hold what they loaded)."""
        if source.scratch:
            await self._io(shutil.rmtree, source.directory, True)

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
        async with self._lock(name):
            override = self._overrides.pop(name, None)
            await self._unload(name)
        if override is not None:
            await self._discard(override)

    def _source(self, name: str) -> ModelSource:
        return self._overrides.get(name) or ModelSource(self.settings.model_repository / name)

    async def _io(self, function: Callable[..., T], *args: Any) -> T:
        """Run file work on the repository-io thread, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._files, function, *args)

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
            scan = await self._io(_scan, name, source)
        except (ConfigError, OSError) as exc:
            self._model_error(name, str(exc))
            return [str(exc)]
        if 0 in table and not table[0].ready:
            del table[0]  # the model-level error is fixed
        loads = []
        for version, path in scan.folders.items():
            fingerprint = scan.fingerprints[version]
            current = table.get(version)
            if current is not None and not current.retired and (
                (current.ready and current.fingerprint == fingerprint)
                or (not retry and fingerprint in (current.fingerprint, current.failed_fingerprint))
            ):
                continue  # unchanged, or failed before as it is now
            loads.append(self._load_version(name, version, scan.config, path, fingerprint))
        failures = [f for f in await asyncio.gather(*loads) if f]
        for entry in [e for v, e in table.items() if v and v not in scan.folders]:
            if not entry.retired:
                await self._retire(entry, "unloaded: not selected by version_policy")
        return failures

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
        labels: dict[str, tuple[str, ...]] = {}
        try:
            if base_config.platform == "ensemble":
                ensemble = await self._load_ensemble(base_config)
                config, spec = base_config, ensemble.spec
            else:
                config, spec, backends, labels = await loop.run_in_executor(
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
            name, version, ModelState.READY, "", config, spec, backends, fingerprint=fingerprint,
            labels=labels,
        )
        if self.metrics is not None:
            entry.stats.metrics = self.metrics.version(name, version)
        if ensemble is not None:
            scheduler: Scheduler = ensemble
        else:
            batcher = DynamicBatcher(
                spec, backends, entry.stats,
                default_max_queue_size=self.settings.default_max_queue_size,
            )
            batcher.start()
            scheduler = batcher
        entry.batcher = cached_scheduler.wrap(scheduler, spec, version, entry.stats, self.cache)
        table[version] = entry  # the switch: new requests go to the new load from here on
        self._default.pop(name, None)
        self.generation += 1
        self._forget_responses(name)
        log.info("model '%s' version %d is READY", name, version)
        if old is not None and old.ready:
            await self._unload_entry(old)
        return None

    async def _load_ensemble(self, config: Any) -> EnsembleScheduler:
        """An ensemble checks its steps against the models serving now (event loop), after
        its cycle check, which reads the other ensembles' configs (repository-io thread)."""
        spec = model_config.to_spec(config, "ensemble")
        if not config.HasField("version_policy"):
            config.version_policy.latest.num_versions = 1
        own = config.name
        overrides = dict(self._overrides)  # a snapshot: the check reads it on another thread
        root = self.settings.model_repository

        def configs(model: str) -> Any | None:
            if model == own:
                return config
            return _ensemble_config(model, overrides.get(model) or ModelSource(root / model))

        await self._io(check_cycles, own, configs)
        if spec.response_cache:
            await asyncio.get_running_loop().run_in_executor(
                self._loader, cache_policy.check_ensemble, spec, config, self._step_model
            )

        def step_spec(model: str, version: str) -> ModelSpec:
            entry = self.get(model, version)
            assert entry.spec is not None
            return entry.spec

        def step_scheduler(model: str, version: str) -> Scheduler:
            entry = self.get(model, version)
            assert entry.batcher is not None
            return entry.batcher

        return EnsembleScheduler(spec, steps_of(config), step_spec, step_scheduler)

    def _step_model(self, model: str, version: str) -> cache_policy.StepModel:
        """A served step model's spec, version folder (None for an ensemble) and config."""
        entry = self.get(model, version)
        assert entry.spec is not None
        folder = entry.backends[0].version_dir if entry.backends else None
        return entry.spec, folder, entry.config

    def _forget_responses(self, name: str) -> None:
        """A version of `name` starts or stops serving: its cached responses (and every
        ensemble's) no longer hold."""
        if self.cache is not None and self.cache.drop_model(name):
            log.info("model '%s': cached responses dropped", name)

    def _load_files(
        self, base_config: Any, path: Path
    ) -> tuple[Any, ModelSpec, list[Backend], dict[str, tuple[str, ...]]]:
        """Loader thread: complete and validate the config, read the labels, load and warm
        the instances."""
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
        labels = model_config.read_labels(config, path)
        model_file = path / spec.model_filename
        if spec.model_filename and not model_file.exists():
            raise ConfigError(f"model '{config.name}': model file {model_file} does not exist")
        cache_policy.check_model(spec, path)
        backends = [backend_class(spec, path, i) for i in range(spec.instance_count)]
        try:
            for backend in backends:
                backend.load()
                warm_up(backend, config, path.parent)
        except BaseException:
            for backend in backends:
                backend.unload()
            raise
        return config, spec, backends, labels

    async def _retire(self, entry: ModelVersion, reason: str) -> None:
        """Unload a version and keep it in the index as UNAVAILABLE with the reason; it is
        no longer meant to be served, and its metric series go."""
        entry.retired = True  # before it turns UNLOADING: readiness never sees it unready
        await self._unload_entry(entry)
        table = self._models.get(entry.name, {})
        if table.get(entry.version) is entry:
            entry.state, entry.reason = ModelState.UNAVAILABLE, reason
        if self.metrics is not None:
            self.metrics.remove_version(entry.name, entry.version)

    async def _unload_entry(self, entry: ModelVersion) -> None:
        """Answer the version's admitted requests, then release it."""
        entry.state = ModelState.UNLOADING
        self._default.pop(entry.name, None)
        self.generation += 1
        self._forget_responses(entry.name)
        if entry.batcher is not None:
            await entry.batcher.drain()
        backends, entry.backends = entry.backends, []
        if backends:
            await asyncio.get_running_loop().run_in_executor(self._loader, _unload_all, backends)
        entry.batcher = None
        entry.state = ModelState.UNAVAILABLE

    async def unload(self, name: str) -> None:
        async with self._lock(name):
            await self._unload(name)

    async def _unload(self, name: str) -> None:
        table = self._models.get(name, {})
        table.pop(0, None)
        for entry in list(table.values()):
            if not entry.retired:
                await self._retire(entry, "unloaded")

    async def shutdown(self) -> None:
        """Answer everything admitted, then unload every version."""
        if self._poller is not None:
            self._poller.cancel()
        for entry in self.entries():
            if entry.backends or entry.batcher is not None:
                await self._unload_entry(entry)
        self._loader.shutdown(wait=False)
        for source in self._overrides.values():
            if source.scratch:
                shutil.rmtree(source.directory, ignore_errors=True)
        self._overrides.clear()
        self._files.shutdown(wait=False)


def _unload_all(backends: list[Backend]) -> None:
    for backend in backends:
        backend.unload()
    _trim_heap()


# -- file work, on the repository-io thread -------------------------------------------------


def _read_config(name: str, source: ModelSource) -> Any:
    """A model's config: the source's override, its config.pbtxt, or an empty one."""
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


def _scan(name: str, source: ModelSource) -> _Scan:
    config = _read_config(name, source)
    on_disk = repository.version_dirs(source.directory)
    if not on_disk:
        raise ConfigError(f"model '{name}': no version folders (1/, 2/, ...) found")
    selected = repository.select_versions(config, list(on_disk))
    text = str(config)
    folders = {v: on_disk[v] for v in selected}
    return _Scan(
        config, folders, {v: repository.fingerprint(text, p) for v, p in folders.items()}
    )


def _ensemble_config(name: str, source: ModelSource) -> Any | None:
    """The parsed config of `name` when it is an ensemble, else None."""
    try:
        config = _read_config(name, source)
    except (ConfigError, OSError):
        return None
    return config if config.platform == "ensemble" else None


def _ensembles(names: list[str], sources: list[ModelSource]) -> list[str]:
    return [n for n, s in zip(names, sources, strict=True) if _ensemble_config(n, s) is not None]


def _check_file_keys(files: dict[str, bytes]) -> None:
    for key in files:
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


def _write_files(name: str, files: dict[str, bytes]) -> Path:
    """A scratch folder holding a load request's files (keys checked by _check_file_keys)."""
    directory = Path(tempfile.mkdtemp(prefix=f"tachyon-{name}-"))
    try:
        for key, content in files.items():
            target = directory / key
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return directory
