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


def site_of(distribution: str) -> str:
    """The folder a distribution is installed in ('' when it is not installed)."""
    from importlib import metadata

    try:
        return str(metadata.distribution(distribution).locate_file(""))
    except metadata.PackageNotFoundError:
        return ""


def gpu_build_clash(cpu_wheel: str, gpu_wheels: tuple[str, ...] = ()) -> str:
    """What to do when a CPU wheel and its GPU build share one folder, else ''.

    `[gpu]` beside the core brings both (onnxruntime is a core dependency), and they write the
    same module: 'onnxruntime and onnxruntime-gpu are both installed ...: pip uninstall ...'.
    In different folders (a venv's GPU build over the system's CPU one) the first on the path
    wins whole, so that is no clash.
    """
    site = site_of(cpu_wheel)
    if not site:
        return ""
    for gpu_wheel in gpu_wheels or (GPU_BUILDS[cpu_wheel],):
        if site_of(gpu_wheel) == site:
            return (
                f"{cpu_wheel} and {gpu_wheel} are both installed and write the same module, "
                f"now the CPU build's: pip uninstall -y {cpu_wheel} && pip install "
                f"--force-reinstall --no-deps {gpu_wheel}"
            )
    return ""
