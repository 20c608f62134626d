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
