"""Backends: one small class per runtime behind `server.backends.base.Backend`."""

from __future__ import annotations

from server.backends.base import Backend, BackendFactory


def factory(backend: str) -> BackendFactory:
    """The backend class for a backend name from the config (imported lazily)."""
    if backend == "onnxruntime":
        from server.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend
    if backend == "tensorrt":
        from server.backends.tensorrt import TensorRtBackend

        return TensorRtBackend
    if backend == "faiss":
        from server.backends.faiss import FaissBackend

        return FaissBackend
    if backend == "tokenizer":
        from server.backends.tokenizer import TokenizerBackend

        return TokenizerBackend
    if backend == "lookup":
        from server.backends.lookup import LookupBackend

        return LookupBackend
    raise ValueError(f"backend '{backend}' is not available in this build")


__all__ = ["Backend", "BackendFactory", "factory"]
