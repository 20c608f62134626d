"""The repository side of `tachyon optimize`: the source version, the new version's number,
publishing it atomically, and whether the model's version_policy serves it.

A new version is built in a hidden staging folder of the repository (`.optimize-...`, which
the repository scan skips) and renamed into place, so a polling server never sees a
half-written version. An existing version is never overwritten.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import text_format

from server import model_config, model_versions, proto, repository
from server.model_config import ConfigError, ModelSpec
from server.optimize.errors import FAILED, OptimizeError

DEFAULT_MAX_BATCH_SIZE = 4  # what `tachyon serve` completes a config-less model with


@dataclass(frozen=True, slots=True)
class Source:
    """The version that is optimised."""

    model_dir: Path
    version: int
    model_file: Path
    config: Any  # the model's config.pbtxt as written (None: the model has none)
    spec: ModelSpec  # the config completed from the graph, as the server sees it


def find_source(repo: Path, model: str, from_version: int | None) -> Source:
    """The source version (the latest unless `from_version`), checked to be an ONNX model."""
    if not repo.is_dir():
        raise OptimizeError(f"--repository {repo} is not a directory")
    model_dir = _model_dir(repo, model)
    versions = repository.version_dirs(model_dir)
    if not versions:
        raise OptimizeError(f"model '{model}' has no version folders in {model_dir}")
    version = max(versions) if from_version is None else from_version
    if version not in versions:
        raise OptimizeError(
            f"--from-version {version}: model '{model}' has no such version, expected one of "
            f"{sorted(versions)}"
        )
    try:
        config = model_config.read_config(model_dir)
        spec, filename = _spec(config, model, versions[version])
    except ConfigError as exc:
        raise OptimizeError(str(exc)) from None
    model_file = versions[version] / filename
    if not model_file.is_file():
        raise OptimizeError(f"model '{model}' version {version}: {model_file} does not exist")
    return Source(model_dir, version, model_file, config, spec)


def _model_dir(repo: Path, model: str) -> Path:
    models = repository.model_dirs(repo)
    if model not in models:
        raise OptimizeError(
            f"--model '{model}' is not in {repo}, expected one of {sorted(models)}"
        )
    return models[model]


def _spec(config: Any, model: str, version_dir: Path) -> tuple[ModelSpec, str]:
    from server.backends.onnxruntime import OnnxRuntimeBackend

    completed = proto.ModelConfig()
    if config is not None:
        completed.CopyFrom(config)
    completed.name = completed.name or model
    backend = model_config.backend_of(completed, version_dir)
    if backend != "onnxruntime":
        kind = completed.platform or completed.backend or backend
        raise OptimizeError(
            f"model '{model}' has platform/backend '{kind}', expected an ONNX model (platform "
            "onnxruntime_onnx): optimize converts ONNX models only"
        )
    if not model_config.is_complete(completed):
        OnnxRuntimeBackend.complete_config(completed, version_dir, DEFAULT_MAX_BATCH_SIZE)
    spec = model_config.to_spec(completed, backend)
    return spec, spec.model_filename


def made_by_optimize(source: Source) -> str:
    """'the int8-static of version 1' when optimize wrote the source version, else ''."""
    path = source.model_file.parent / "report.json"
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
        return f"the {found['target']} of version {found['source_version']}"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def next_version(model_dir: Path, requested: int | None) -> int:
    """`requested` when it is new, else one after the highest existing version."""
    existing = set(repository.version_dirs(model_dir))
    if requested is None:
        return max(existing, default=0) + 1
    if requested < 1:
        raise OptimizeError(f"--version {requested} is invalid, expected a positive integer")
    if requested in existing or (model_dir / str(requested)).exists():
        raise OptimizeError(
            f"--version {requested}: model '{model_dir.name}' version {requested} exists in "
            f"{model_dir}, expected a new version (omit --version to write "
            f"{max(existing, default=0) + 1}); optimize never overwrites a version"
        )
    return requested


def staging_dir(repo: Path, model: str) -> Path:
    """A new hidden folder in the repository (same file system, so the rename is atomic)."""
    path = repo / f".optimize-{model}-{os.getpid()}-{secrets.token_hex(4)}"
    path.mkdir()
    return path


def publish(staging: Path, model_dir: Path, version: int) -> Path:
    """Rename the staged version into place; refuses a version folder that appeared meanwhile."""
    final = model_dir / str(version)
    try:
        model_versions.move_into_place(staging, final)
    except FileExistsError:
        raise OptimizeError(
            f"model '{model_dir.name}' version {version} appeared in {model_dir} while optimize "
            "ran; nothing was written (run it again for the next version)"
        ) from None
    except OSError as exc:
        raise OptimizeError(f"cannot move the new version to {final}: {exc}", FAILED) from None
    return final


def discard(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)


@dataclass(frozen=True, slots=True)
class PolicyCheck:
    served: list[int]  # the versions the policy serves once the new one exists
    serves_new: bool
    policy: str  # as written in config.pbtxt, for messages


def check_policy(source: Source, new_version: int) -> PolicyCheck:
    config = source.config if source.config is not None else proto.ModelConfig()
    available = [*repository.version_dirs(source.model_dir), new_version]
    served = repository.select_versions(config, sorted(set(available)))
    return PolicyCheck(served, new_version in served, _policy_text(config))


def _policy_text(config: Any) -> str:
    if not config.HasField("version_policy"):
        return "latest { num_versions: 1 } (the default)"
    text = text_format.MessageToString(config.version_policy, as_one_line=True)
    return text or "latest { num_versions: 1 } (the default)"


def add_to_policy(source: Source, new_version: int) -> Path:
    """Add the new version to a `specific` policy and rewrite config.pbtxt atomically (in
    protobuf text format: comments are not kept). Other policies already serve it."""
    config = source.config
    if config is None or config.version_policy.WhichOneof("policy_choice") != "specific":
        raise OptimizeError("--update-policy applies to a 'specific' version_policy only")
    config.version_policy.specific.versions.append(new_version)
    path = source.model_dir / model_config.CONFIG_FILE
    try:
        model_versions.write_text_atomically(path, text_format.MessageToString(config))
    except OSError as exc:
        raise OptimizeError(f"cannot rewrite {path}: {exc}", FAILED) from None
    return path
