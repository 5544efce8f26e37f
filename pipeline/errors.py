"""Errors that map to the contract's exit codes, and the one walk from any failure to them.

0 success; 2 bad usage or config; 3 invalid input data; 1 any other failure.

A failure raised in a Ray Data task or a Ray Train worker reaches the driver wrapped by Ray
(``RayTaskError`` keeps the original exception as ``.cause``; Ray Train and Ray Data chain theirs
with ``raise ... from``): :func:`causes` walks that chain, :func:`vaepipe_error_in` finds the
:class:`VaepipeError` in it and :func:`root_message` names the exception that started it.
``pipeline.runtime.job_main`` turns either into the exit code and a one-line message.

:class:`FailureHook` is the test-only failure injection shared by the train and score jobs.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

FAIL_AT_ENV = "VAEPIPE_TEST_FAIL_AT"


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


def causes(e: BaseException | None, follow_context: bool = False):
    """The exception and what caused it, outermost first. Ray task errors carry the task's own
    exception in ``.cause``; ``follow_context`` also walks ``__context__`` (raised while handling)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = getattr(e, "cause", None) or e.__cause__ or (e.__context__ if follow_context else None)


def first_line(e: BaseException, limit: int = 500) -> str:
    """The first non-blank line of an exception's message, capped at `limit` characters."""
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[0][:limit] if lines else ""


def vaepipe_error_in(e: BaseException) -> VaepipeError | None:
    """The first :class:`VaepipeError` in the exception's cause chain, wherever Ray wrapped it.

    Ray's wrapper of a task's exception is an instance of that exception's class too (its message is
    Ray's traceback text): it is passed over for the original, which it holds as ``.cause``."""
    return next(
        (
            c
            for c in causes(e, follow_context=True)
            if isinstance(c, VaepipeError) and not isinstance(getattr(c, "cause", None), BaseException)
        ),
        None,
    )


def root_message(e: BaseException) -> str:
    """``Type: first line`` of the exception that started the failure (the end of its cause chain)."""
    root = list(causes(e))[-1]
    return f"{type(root).__name__}: {first_line(root)}"


# ---- the test-only failure hook --------------------------------------------------------------------
class InjectedFailure(RuntimeError):
    """Raised by the test-only failure hook."""


@dataclass(frozen=True)
class FailureHook:
    """Test-only failure injection, set by ``VAEPIPE_TEST_FAIL_AT="N [M ...] [kill:POINT ...]"``: each
    scoring worker process raises when it starts its batch N (a failed batch does not count, so it keeps
    failing there); the last training worker raises at the start of epoch N, once per ``marker`` (a file
    ``MARKER.N`` records that it fired). ``kill:POINT``: the process SIGKILLs itself when it reaches
    the named point (:meth:`kill_point`; the publish steps name theirs).
    Crosses to Ray as a plain dict."""

    at: tuple[int, ...] = ()
    marker: str | None = None
    kill_at: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, marker: str | None = None) -> FailureHook:
        tokens = os.environ.get(FAIL_AT_ENV, "").split()
        at = tuple(int(v) for v in tokens if not v.startswith("kill:"))
        kill_at = tuple(v[len("kill:") :] for v in tokens if v.startswith("kill:"))
        return cls(at, marker, kill_at)

    def kill_point(self, name: str) -> None:
        """SIGKILL this process here when asked to (a crash no cleanup code can see)."""
        if name in self.kill_at:
            import signal

            os.kill(os.getpid(), signal.SIGKILL)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> FailureHook:
        d = d or {}
        return cls(tuple(d.get("at", ())), d.get("marker"), tuple(d.get("kill_at", ())))

    def check(self, step: int, what: str) -> None:
        """Raise :class:`InjectedFailure` at ``step`` when asked to (``what``: "batch", "epoch")."""
        if step not in self.at:
            return
        if self.marker is not None:
            from pipeline.io import storage

            marker = f"{self.marker}.{step}"
            if storage.exists(marker):
                return
            storage.write_text(marker, f"failure injected at {what} {step}\n")
        raise InjectedFailure(f"{FAIL_AT_ENV}: failing at the start of {what} {step}")
