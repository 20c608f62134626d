"""The optional parts of an install and what a missing one tells the user.

The core install serves ONNX models; FAISS, tokenizers, the benchmark suite and tracing come
with extras (pyproject.toml). Code that needs one imports it where it is used and, when the
import fails, says which extra brings it, in these words.
"""

from __future__ import annotations

PACKAGE = "tachyon-serve"


def needs(extra: str) -> str:
    """'needs the faiss extra: pip install tachyon-serve[faiss]'"""
    return f"needs the {extra} extra: pip install {PACKAGE}[{extra}]"


def missing(what: str, extra: str, exc: ImportError) -> str:
    """'<what> needs the <extra> extra: pip install tachyon-serve[<extra>] (<import error>)'"""
    return f"{what} {needs(extra)} ({exc})"


# CPU wheel -> its GPU build; each pair installs one and the same module, so with both installed
# the files of whichever was installed last win (the CPU build, after a plain `pip install`)
GPU_BUILDS = {"onnxruntime": "onnxruntime-gpu", "faiss-cpu": "faiss-gpu"}


def installed(distribution: str) -> bool:
    from importlib import metadata

    try:
        metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        return False
    return True


def gpu_build_clash(cpu_wheel: str, gpu_wheels: tuple[str, ...] = ()) -> str:
    """What to do when a CPU wheel and its GPU build are both installed, else ''.

    `[gpu]` beside the core brings both (onnxruntime is a core dependency), and they share one
    module: 'onnxruntime and onnxruntime-gpu are both installed ...: pip uninstall ...'.
    """
    if not installed(cpu_wheel):
        return ""
    for gpu_wheel in gpu_wheels or (GPU_BUILDS[cpu_wheel],):
        if installed(gpu_wheel):
            return (
                f"{cpu_wheel} and {gpu_wheel} are both installed and write the same module, "
                f"now the CPU build's: pip uninstall -y {cpu_wheel} && pip install "
                f"--force-reinstall --no-deps {gpu_wheel}"
            )
    return ""
