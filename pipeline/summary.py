"""A run's outcome as JSON (``--summary-json PATH``), and the log format (``--log-format text|json``).

Every job takes both options (:func:`add_options`, called by ``runtime.job_main``). The summary is
written when the job ends, on success and on failure alike (bad usage included), so a scheduler can
gate on it without parsing prose::

    {"command": "score", "status": "succeeded", "exit_code": 0, "error": null,
     "run_id": "...", "run_date": "2026-01-15", "rows_in": 1000, "scored_rows": 998, "quarantined_rows": 2,
     "seconds": 12.3, "started_at": "...+00:00", "finished_at": "...+00:00",
     "output_uri": "...", "model_uri": "...", "model_id": "...", "data_uri": "..."}

Jobs add what they know with :func:`record` (``record(rows_in=..., scored_rows=...)``); a key they
never learn stays null. The file goes where the option says (a local path or s3://), never into the
output table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from pipeline.errors import first_line

log = logging.getLogger("vaepipe")

LOG_FORMATS = ("text", "json")
_FIELDS = (
    "command", "status", "exit_code", "error", "run_id", "run_date", "rows_in", "scored_rows", "quarantined_rows",
    "seconds", "started_at", "finished_at", "data_uri", "output_uri", "model_uri", "model_id",
)  # fmt: skip

_current: dict[str, Any] | None = None


def add_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("run outcome and logs")
    g.add_argument("--summary-json", metavar="PATH", default=None, help="write the run's outcome as JSON here")
    g.add_argument("--log-format", choices=LOG_FORMATS, default="text", help="log lines as text or JSON objects")
    return parser


def record(**values: Any) -> None:
    """Add what the running job knows to its summary (no-op outside a job)."""
    if _current is not None:
        _current.update(values)


def note_args(args: argparse.Namespace) -> None:
    """The parsed options: log format, and the URIs every summary names."""
    configure_logging(getattr(args, "log_format", "text"))
    record(
        data_uri=getattr(args, "data", None),
        output_uri=getattr(args, "output", None) or getattr(args, "scores", None),
        model_uri=getattr(args, "model_dir", None),
        run_date=getattr(args, "run_date", None),
    )


def note_error(e: BaseException | str) -> None:
    record(error=e if isinstance(e, str) else (first_line(e) or type(e).__name__))


def _pre_parse(argv: Sequence[str]) -> tuple[str | None, str]:
    """--summary-json and --log-format before the job's parser runs (it may fail), from flags or --config."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--summary-json", "--summary_json", dest="summary_json")
    pre.add_argument("--log-format", "--log_format", dest="log_format")
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(list(argv))
    path, fmt = known.summary_json, known.log_format
    if known.config and (path is None or fmt is None):
        try:
            import yaml

            from pipeline.io import storage

            raw = yaml.safe_load(storage.read_text(known.config)) or {}
            if isinstance(raw, dict):
                path = path or raw.get("summary-json") or raw.get("summary_json")
                fmt = fmt or raw.get("log-format") or raw.get("log_format")
        except Exception:  # noqa: BLE001 -- the job's own parser reports a bad config file
            pass
    return path, fmt if fmt in LOG_FORMATS else "text"


def wrap(main: Callable[[Sequence[str] | None], int], command: str) -> Callable[[Sequence[str] | None], int]:
    """A job's main that writes its summary when it ends, however it ends."""

    def run(argv: Sequence[str] | None = None) -> int:
        global _current
        argv = list(sys.argv[1:] if argv is None else argv)
        path, fmt = _pre_parse(argv)
        configure_logging(fmt)
        started, t0 = dt.datetime.now().astimezone(), time.perf_counter()
        outer = _current  # a job run inside another (the demo runs train and score): restored at the end
        _current = dict.fromkeys(_FIELDS) | {"command": command, "run_id": new_run_id(), "started_at": started}
        code: int = 1
        try:
            code = int(main(argv) or 0)
            return code
        except SystemExit as e:  # argparse: --help (0) or bad usage (2)
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
            raise
        except BaseException as e:
            if _current.get("error") is None:
                note_error(f"{type(e).__name__}: {first_line(e)}")
            raise
        finally:
            summary, _current = _current, outer
            summary |= {
                "exit_code": code,
                "status": "succeeded" if code == 0 else "failed",
                "seconds": round(time.perf_counter() - t0, 3),
                "finished_at": dt.datetime.now().astimezone(),
            }
            if code != 0 and summary.get("error") is None:
                summary["error"] = f"exit code {code}"
            if path:
                write(path, summary)

    return run


def new_run_id() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]


def write(path: str, summary: dict[str, Any]) -> None:
    from pipeline.io import storage

    text = json.dumps(summary, indent=1, default=_json_default) + "\n"
    try:
        if storage.is_s3(path):
            storage.write_text(path, text)
        else:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            tmp = f"{path}.tmp-{os.getpid()}"
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, path)  # a reader never sees half a summary
    except Exception as e:  # noqa: BLE001 -- the job's own outcome stands; say why there is no summary
        log.error("could not write the run summary to %s: %s", path, first_line(e))


def _json_default(v: Any) -> Any:
    if isinstance(v, dt.datetime | dt.date):
        return v.isoformat()
    return str(v)


# ---- logs -----------------------------------------------------------------------------------------
class _IsoFormatter(logging.Formatter):
    """``2026-01-15T09:30:01.123+01:00 INFO vaepipe.score: message``: local time with its UTC offset."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        return iso_time(record.created)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (ISO 8601 with offset), level, logger, message, run_id; exc if any."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": iso_time(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if _current is not None and _current.get("run_id"):
            out["run_id"] = _current["run_id"]
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def iso_time(created: float) -> str:
    return dt.datetime.fromtimestamp(created).astimezone().isoformat(timespec="milliseconds")


def make_formatter(fmt: str = "text") -> logging.Formatter:
    if fmt == "json":
        return JsonFormatter()
    return _IsoFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")


def configure_logging(fmt: str = "text", level: str | None = None) -> None:
    """One stderr handler on the root logger in the chosen format (replacing the one set before). Where
    something else already installed handlers (a test runner, a host application), those are left as
    they are and none is added."""
    root = logging.getLogger()
    root.setLevel(os.environ.get("VAEPIPE_LOG_LEVEL", level or "INFO"))
    formatter = make_formatter(fmt)
    ours = [h for h in root.handlers if getattr(h, "_vaepipe", False)]
    if ours or not root.handlers:
        for h in ours:
            root.removeHandler(h)
        handler = logging.StreamHandler()
        handler._vaepipe = True  # type: ignore[attr-defined]
        handler.setFormatter(formatter)
        root.addHandler(handler)
