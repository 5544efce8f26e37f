"""Errors that map to the contract's exit codes.

0 success; 2 bad usage or config; 3 invalid input data; 1 any other failure.
"""

from __future__ import annotations


class VaepipeError(Exception):
    exit_code = 1


class UsageError(VaepipeError):
    """Bad command line, config file or feature spec (exit code 2)."""

    exit_code = 2


class InputDataError(VaepipeError):
    """The input data cannot be used: names the file and column (exit code 3)."""

    exit_code = 3

    def __init__(self, message: str, *, file: str | None = None, column: str | None = None):
        parts = [message]
        if column is not None:
            parts.append(f"column {column!r}")
        if file is not None:
            parts.append(f"file {file}")
        super().__init__(": ".join(parts[:1]) + ("" if len(parts) == 1 else " (" + ", ".join(parts[1:]) + ")"))
        self.file = file
        self.column = column
