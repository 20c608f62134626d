"""Tachyon: a KServe v2 / Open Inference Protocol model server."""

__version__ = "0.1.0"
