"""New model versions written beside served ones, atomically (`tachyon index tune`, `tachyon
bench tune`).

A version folder is filled in a hidden staging folder of the repository (the repository scan
skips names starting with "."), the model's config.pbtxt is replaced atomically, then the
folder is renamed to the next version number: a polling server never sees half a version, and
an existing version is never overwritten.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from server import model_config, repository


@dataclass(frozen=True, slots=True)
class Published:
    version: int
    version_dir: Path
    config_path: Path


def versions(model_dir: Path) -> list[int]:
    """The model's numeric version folders, ascending."""
    if not model_dir.is_dir():
        return []
    return sorted(repository.version_dirs(model_dir))


def write_text_atomically(path: Path, text: str) -> None:
    """Replace `path` with `text` by a rename (a reader sees the old file or the new one)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def move_into_place(staging: Path, target: Path) -> None:
    """Rename a staged version folder to `target`; FileExistsError when `target` appeared
    meanwhile (a version is never overwritten)."""
    if target.exists():
        raise FileExistsError(f"version folder {target} appeared while writing; run again")
    staging.rename(target)


def publish(
    model_dir: Path, files: Mapping[str, bytes | Path], config_text: str | None
) -> Published:
    """Write `files` (name -> contents, or a file or folder to copy) as the next version of
    the model in `model_dir`, and `config_text` (when given) as its config.pbtxt. Raises
    OSError when the disk refuses; then nothing is left behind but possibly the new config."""
    number = (versions(model_dir) or [0])[-1] + 1
    staging = model_dir.parent / f".staging-{model_dir.name}-{number}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        for name, content in files.items():
            if isinstance(content, Path) and content.is_dir():
                shutil.copytree(content, staging / name)
            elif isinstance(content, Path):
                shutil.copy2(content, staging / name)
            else:
                (staging / name).write_bytes(content)
        config_path = model_dir / model_config.CONFIG_FILE
        if config_text is not None:
            old = config_path.read_text(encoding="utf-8") if config_path.exists() else None
            if old != config_text:
                write_text_atomically(config_path, config_text)
        target = model_dir / str(number)
        move_into_place(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Published(number, target, config_path)


def policy_note(config: object, published: Published) -> str:
    """A warning when the model's version_policy does not serve the new version ('' when it
    does, or when the model has no config, whose default policy serves the latest)."""
    if config is None:
        return ""
    model_dir = published.version_dir.parent
    if published.version in repository.select_versions(config, versions(model_dir)):
        return ""
    return (f"warning: the version_policy in {published.config_path} does not serve version "
            f"{published.version}; a server keeps serving the versions it lists")
