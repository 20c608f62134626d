"""Model lifecycle: which versions exist, their readiness, loading and unloading.

One enum (`ModelState`) and one owner (`ModelManager`) change a version's readiness. Loading
(reading files, creating sessions) runs on loader threads, never on the event loop.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server import model_config, repository
from server.backends import Backend, factory
from server.batching import DynamicBatcher
from server.config import ServerSettings
from server.errors import ServingError, not_found, unavailable
from server.model_config import ConfigError, ModelSpec
from server.statistics import ModelStats

log = logging.getLogger(__name__)


class ModelState(enum.Enum):
    UNKNOWN = "UNKNOWN"
    READY = "READY"
    UNAVAILABLE = "UNAVAILABLE"
    LOADING = "LOADING"
    UNLOADING = "UNLOADING"


@dataclass(eq=False)
class ModelVersion:
    """One version of one model, and everything that serves it."""

    name: str
    version: int  # 0 when no version could be found (the reason says why)
    state: ModelState = ModelState.UNKNOWN
    reason: str = ""
    config: Any = None  # the completed protobuf ModelConfig
    spec: ModelSpec | None = None
    backends: list[Backend] = field(default_factory=list)
    batcher: DynamicBatcher | None = None
    stats: ModelStats = field(default_factory=ModelStats)

    @property
    def ready(self) -> bool:
        return self.state is ModelState.READY


class ModelManager:
    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self._models: dict[str, dict[int, ModelVersion]] = {}
        # the version a request without a version goes to, refreshed on every state change
        self._default: dict[str, ModelVersion] = {}
        self._loader = ThreadPoolExecutor(
            settings.model_load_threads, thread_name_prefix="model-load"
        )

    # -- queries (event loop) -----------------------------------------------------------

    def get(self, name: str, version: str = "") -> ModelVersion:
        """The version that serves `name` (highest READY by default) or a ServingError."""
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
        return [v for name in sorted(self._models) for v in self._models[name].values()]

    def find_config(self, name: str, version: str = "") -> Any:
        """The config of a version for the ModelConfig RPC (also for an unready model)."""
        return self.get(name, version).config

    # -- lifecycle ----------------------------------------------------------------------

    async def load_repository(self) -> None:
        """Load every model of the repository (model control mode `none`)."""
        dirs = repository.model_dirs(self.settings.model_repository)
        await asyncio.gather(*(self.load_model(name, path) for name, path in dirs.items()))

    async def load_model(self, name: str, model_dir: Path) -> None:
        try:
            config = model_config.read_config(model_dir)
            versions = repository.version_dirs(model_dir)
            if not versions:
                raise ConfigError(f"model '{name}': no version folders (1/, 2/, ...) found")
            if config is None:
                config = model_config.parse_config("", name)
            if config.name != name:
                raise ConfigError(
                    f"model '{name}': config.pbtxt name '{config.name}' does not match the "
                    f"folder name '{name}'"
                )
            selected = repository.select_versions(config, list(versions))
        except (ConfigError, OSError) as exc:
            self._set_failed(name, 0, str(exc))
            return
        table = self._models.setdefault(name, {})
        table.pop(0, None)
        for version in selected:
            table[version] = ModelVersion(name, version, ModelState.LOADING)
        await asyncio.gather(
            *(self._load_version(table[v], config, versions[v]) for v in selected)
        )

    def _set_failed(self, name: str, version: int, reason: str) -> None:
        log.error("model '%s' is unavailable: %s", name, reason)
        entry = ModelVersion(name, version, ModelState.UNAVAILABLE, reason)
        self._models.setdefault(name, {})[version] = entry

    async def _load_version(self, entry: ModelVersion, base_config: Any, path: Path) -> None:
        loop = asyncio.get_running_loop()
        try:
            config, spec, backends = await loop.run_in_executor(
                self._loader, self._load_files, base_config, path
            )
        except Exception as exc:
            entry.state, entry.reason = ModelState.UNAVAILABLE, str(exc)
            log.error("model '%s' version %d is unavailable: %s", entry.name, entry.version, exc)
            return
        entry.config, entry.spec, entry.backends = config, spec, backends
        entry.batcher = DynamicBatcher(spec, backends, entry.stats)
        entry.batcher.start()
        entry.state, entry.reason = ModelState.READY, ""
        self._default.pop(entry.name, None)
        log.info("model '%s' version %d is READY", entry.name, entry.version)

    def _load_files(
        self, base_config: Any, path: Path
    ) -> tuple[Any, ModelSpec, list[Backend]]:
        """Loader thread: complete and validate the config, create and load the instances."""
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
        for backend in backends:
            backend.load()
        return config, spec, backends

    async def shutdown(self) -> None:
        """Answer everything admitted, then unload every version."""
        for entry in self.entries():
            self._default.pop(entry.name, None)
            if entry.batcher is not None:
                entry.state = ModelState.UNLOADING
                await entry.batcher.drain()
            for backend in entry.backends:
                backend.unload()
        self._loader.shutdown(wait=False)
