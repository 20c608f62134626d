"""The model repository on disk: Triton's layout and version policies.

    <repository>/<model>/config.pbtxt          (optional for ONNX models)
    <repository>/<model>/<version>/model.onnx  (numeric, positive version folders)

Everything here reads the disk: the manager calls it off the event loop.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def model_dirs(repository: Path) -> dict[str, Path]:
    """Every model folder in the repository, by name."""
    if not repository.is_dir():
        raise FileNotFoundError(f"model repository '{repository}' is not a directory")
    return {
        p.name: p
        for p in sorted(repository.iterdir())
        if p.is_dir() and not p.name.startswith((".", "_"))
    }


def version_dirs(model_dir: Path) -> dict[int, Path]:
    """Version folders by number; folders that are not positive integers are skipped."""
    versions = {}
    for path in sorted(model_dir.iterdir()):
        if not path.is_dir():
            continue
        if path.name.isdigit() and int(path.name) > 0:
            versions[int(path.name)] = path
        else:
            log.info(
                "model '%s': ignoring folder '%s', not a positive version number",
                model_dir.name,
                path.name,
            )
    return versions


def select_versions(config: Any, available: list[int]) -> list[int]:
    """The versions a config's version_policy serves (default: the latest one)."""
    available = sorted(available)
    policy = config.version_policy
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return available
    if choice == "specific":
        wanted = {int(v) for v in policy.specific.versions}
        missing = wanted - set(available)
        if missing:
            log.warning(
                "model '%s': version_policy asks for versions %s that are not in the repository",
                config.name,
                sorted(missing),
            )
        return [v for v in available if v in wanted]
    count = int(policy.latest.num_versions) if choice == "latest" else 1
    return available[-max(count, 1) :]


def fingerprint(config_text: str, version_dir: Path) -> str:
    """Changes when the config or any file of the version folder changes (sizes and
    modification times: no file is read)."""
    digest = hashlib.sha1(config_text.encode(), usedforsecurity=False)
    for path in sorted(version_dir.rglob("*")):
        if path.is_file():
            stat = path.stat()
            key = f"{path.relative_to(version_dir)}:{stat.st_size}:{stat.st_mtime_ns}"
            digest.update(key.encode())
    return digest.hexdigest()
