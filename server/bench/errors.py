"""The one error type of `tachyon bench`."""

from __future__ import annotations


class BenchError(Exception):
    """Bad input or an unusable server, found before any load is sent: the message says what to
    fix; `tachyon bench` prints it on stderr and exits with status 2."""
