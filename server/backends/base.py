"""The backend interface.

Lifecycle and ownership (one object per model instance):
  * `load()` runs once on a loader thread, before the instance serves; it may take seconds.
  * `execute(inputs, outputs, options)` runs on the instance's own thread, one whole batch at
    a time, never
    concurrently with itself. `inputs` maps every input name to a numpy array whose first
    dimension is the batch (when the model batches). The backend may read the arrays only
    until it returns; it returns new arrays it no longer touches, one per output it was asked
    for, with the same batch size. It never sees individual requests: the batcher merges and
    splits.
  * `unload()` runs once, after the last `execute` returned; it releases what `load` took.
  * `metadata()` is cheap, thread-safe and describes the loaded model (platform name).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from server.model_config import ModelSpec
from server.types import Array, Parameters

Options = tuple[tuple[str, "bool | int | float | str"], ...]


class Backend(ABC):
    platform: ClassVar[str] = ""

    def __init__(self, spec: ModelSpec, version_dir: Path, instance: int = 0) -> None:
        self.spec = spec
        self.version_dir = version_dir
        self.instance = instance

    @classmethod
    def complete_config(cls, config: Any, version_dir: Path, default_max_batch_size: int) -> None:
        """Fill what a config leaves out (inputs, outputs, max_batch_size) from the model
        file, in place. Backends that cannot describe themselves leave it as it is."""
        return None  # an optional hook: most backends describe themselves

    def request_options(self, parameters: Parameters) -> Options:
        """The request parameters that change how a batch runs (FAISS's `k`, `nprobe`), as a
        hashable value: requests share a batch only when theirs are equal, and `execute`
        receives them. Raise ValueError naming the parameter when one is bad. Most backends
        take none."""
        return ()

    def check_request(self, inputs: dict[str, Array]) -> None:
        """Per-request checks beyond names, types and shapes, run on the event loop before
        the request is queued, so one bad request cannot fail a whole batch. Raise ValueError
        with a message for the client. Must be cheap and thread-safe."""
        return None  # an optional hook: most backends need nothing more

    def gather(self, parts: Sequence[dict[str, Array]]) -> dict[str, Array] | None:
        """Optional: gather one batch's request inputs (in request order) into the backend's
        own buffers, e.g. pinned host memory bound to a GPU session, and return the batch's
        inputs for `execute`; runs on the instance thread just before `execute`. None (the
        default): the batcher gathers."""
        return None

    @abstractmethod
    def load(self) -> None: ...

    @abstractmethod
    def execute(
        self, inputs: dict[str, Array], outputs: list[str], options: Options = ()
    ) -> dict[str, Array]: ...

    @abstractmethod
    def unload(self) -> None: ...

    def metadata(self) -> dict[str, str]:
        return {"platform": self.spec.platform or self.platform}


BackendFactory = type[Backend]
