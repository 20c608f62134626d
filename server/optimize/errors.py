"""The one error type of `tachyon optimize`: a message that says what to fix, and an exit code."""

from __future__ import annotations

BAD_INPUT = 2  # the command line, the repository or a data file asks for something impossible
FAILED = 1  # the conversion, the check of its result or a write failed


class OptimizeError(Exception):
    """A refusal or a failure; `message` names the field, the value and what was expected."""

    def __init__(self, message: str, exit_code: int = BAD_INPUT) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
