"""What every job entry point shares: YAML config + flags, exit codes, logging, joining Ray.

A job module defines ``build_parser()`` and ``run(args) -> int`` and ends with
``main = job_main(build_parser, run)``. Any option may come from ``--config job.yaml`` (keys are the
long option names, with dashes or underscores); flags on the command line override the file.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any, TypeVar

import yaml

from pipeline import summary
from pipeline.errors import UsageError, root_message, vaepipe_error_in

log = logging.getLogger("vaepipe")

T = TypeVar("T")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse exits 2 too; keep its message, prefix the prog
        self.print_usage(sys.stderr)
        summary.note_error(f"{self.prog}: {message}")
        self.exit(2, f"{self.prog}: error: {message}\n")


def make_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", metavar="YAML", help="read options from a YAML file; flags override it")
    return p


def add_ray_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ray-address",
        default=None,
        help="Ray cluster to join (default: $RAY_ADDRESS, else start a local Ray instance)",
    )
    p.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL (default: $AWS_ENDPOINT_URL)")


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**_config_defaults(parser, known.config))
    return parser.parse_args(argv)


def _config_defaults(parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    from pipeline.io import storage

    try:
        raw = yaml.safe_load(storage.read_text(path)) or {}
    except FileNotFoundError as e:
        raise UsageError(f"config file not found: {path}") from e
    except yaml.YAMLError as e:
        raise UsageError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: a config file is a mapping of option: value")
    dests = {a.dest for a in parser._actions}
    out = {}
    for key, value in raw.items():
        dest = str(key).replace("-", "_")
        if dest not in dests or dest in ("help", "config"):
            raise UsageError(f"{path}: unknown option {key!r}")
        out[dest] = value
    # an option or positional given in the file is no longer required on the command line
    for a in parser._actions:
        if a.dest in out:
            a.required = False
            if not a.option_strings:
                a.nargs = "?"
    return out


def options_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """A job's typed run configuration: the dataclass ``cls`` with each field taken from the flag of
    the same name."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Log lines with the date and the UTC offset (ISO 8601), as text or JSON (pipeline/summary.py)."""
    summary.configure_logging(fmt, level)


def job_main(
    build_parser: Callable[[], argparse.ArgumentParser], run: Callable[[argparse.Namespace], int | None]
) -> Callable[[Sequence[str] | None], int]:
    """Wrap a job: parse (config + flags), run, map errors to the contract's exit codes.

    Every failure ends here: a :class:`VaepipeError` anywhere in the exception's cause chain (raised
    in the driver, a Ray Data task or a Ray Train worker) gives its exit code and message; anything
    else exits 1 with the root cause's type and first line (the traceback is logged at DEBUG)."""

    def main(argv: Sequence[str] | None = None) -> int:
        setup_logging()
        try:
            args = parse_args(summary.add_options(build_parser()), argv)
            summary.note_args(args)
            if getattr(args, "s3_endpoint", None):
                from pipeline.io import storage

                storage.configure(args.s3_endpoint)
            return int(run(args) or 0)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        except Exception as e:
            err = vaepipe_error_in(e)
            if err is None:
                log.debug("unexpected failure", exc_info=True)
                summary.note_error(root_message(e))
                print(f"error: {root_message(e)}", file=sys.stderr)
                return 1
            summary.note_error(err)
            print(f"error: {err}", file=sys.stderr)
            return err.exit_code

    # --summary-json: the run's outcome, written however the job ends
    return summary.wrap(main, build_parser.__module__.rsplit(".", 1)[-1].replace("_", "-"))


# Ray's console lines that a user of these jobs can do nothing about: dropped from the driver's console
# (they stay in Ray's session logs under /tmp/ray). Worker start-up concurrency (the raylet), actor
# constructor arguments in the object store (Ray Train's own actors), Ray Train's per-step bookkeeping
# and Ray Data's hints about optional UI packages and a deprecated option Ray Train itself passes.
RAY_NOISE = (
    r"PYTHON worker processes have been started",
    r"constructor arguments in the object store",
    r"Setting up process group for",
    r"Moving model to device",
    r"Started training worker group",
    r"world_rank=\d+, local_rank=\d+, node_rank=\d+",
    r"Checkpoint successfully created at",
    r"Reporting training result",
    r"A new progress UI is available",
    r"RayDeprecationWarning: `ExecutionOptions.exclude_resources`",
    r"^\s*self\.exclude_resources = exclude_resources",
    r"Starting execution of Dataset|Execution plan of Dataset|execution finished in [\d.]+ seconds",
    r"Registered dataset logger for dataset",
    # a worker's Ray Data (the split coordinator of training) says its bars are off: the job draws its own
    r"Progress bars disabled\. To enable, set",
    # Ray Train's placement-group monitor polls the State API, which a local instance without the
    # dashboard does not serve: it says so every few seconds for the whole run
    r"Failed to query Ray Train Controller actor state",
)
# What the job's Ray processes get (a value already in the environment wins):
# * Ray Train's print patch both logs and tees a worker's print, which shows every progress line twice;
# * Ray Train's controller looks at its workers every 2 s by default, so a run's end (and each step of its
#   start) waits up to that long to be seen: a quarter of it costs the workers a status call more often.
WORKER_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
# What a local instance's processes get (a value already in the environment wins):
# * an idle worker process beyond one per CPU lives 30 s instead of 1 s, so the scoring tasks find the process
#   that imported torch and loaded the model (pipeline.score.settings.warm_scorer) still there after Ray Data's
#   planning;
# * Ray Train's preemption watcher (an actor polling for node drains, which a local instance never has) and
#   its metrics (exported through a dashboard that a local instance does not run) are off: together about
#   2.5 s of CPU on a training job's critical start (adult, 1 worker, 2 epochs: 30.3 / 28.0 s with them,
#   28.2 / 25.3 s without, runs alternating).
LOCAL_RAY_ENV = {
    "RAY_idle_worker_killing_time_threshold_ms": "30000",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_METRICS_ENABLED": "0",
}


# glibc's malloc hands a freed block of 128 KiB or more back to the kernel (munmap) and trims the heap's top
# above twice that, each threshold rising with the blocks freed; a scoring pass allocates and frees tensors of
# several MiB in many sizes (8,192 rows x 70 parameters in float64: 4.6 MiB), so pass after pass faulted
# fresh pages in: three batches of 4,096 adult records took 360,000 to 650,000 minor faults and 12-19% of
# their time in the kernel (5.5-6.2 s); with the thresholds fixed, no faults and 4.8-4.9 s.
MALLOC_MMAP_THRESHOLD = 32 << 20  # glibc's largest: blocks below it come from the heap
MALLOC_TRIM_THRESHOLD = 256 << 20  # free memory at the heap's top kept up to this much
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)


def retain_freed_memory() -> bool:
    """Keep memory that tensors free in this process's heap for the next ones, instead of returning it to
    the kernel and faulting it in again (glibc; elsewhere a no-op): the process keeps its peak working set.
    vaepipe's own processes call it (the ``vaepipe`` command's, the scoring and training workers); the
    in-process API, and a job run with ``python -m jobs.NAME``, leave their process as it is. Returns
    whether the allocator took the settings."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # no C library to ask, or not glibc's interface
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD)
    )


class _DropMessages(logging.Filter):
    """Drops the records of one logger whose message matches a pattern."""

    def __init__(self, pattern: str):
        super().__init__()
        import re

        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


# Ray Data warns, when a dataset starts while the cluster shows no CPU available, that the job "will hang
# unless more CPUs are freed up": the scoring job starts its dataset the moment its warm-up tasks end, before
# the cluster's view has their CPUs back (a local instance has one CPU per scoring worker), and its tasks
# start a moment later. A cluster with fewer CPUs than workers gets the job's own warning (score.run).
_NO_CPU_WARNING = _DropMessages(r"does not have any available CPUs")


def quiet_ray() -> None:
    """Drop :data:`RAY_NOISE` from the worker lines Ray forwards to this driver, and the driver-side
    notices about optional packages; call before or after ``import ray``."""
    import re

    pattern = "|".join(f"(?:{p})" for p in RAY_NOISE)
    os.environ.setdefault("RAY_DEDUP_LOGS_SKIP_REGEX", pattern)
    try:  # already imported: Ray read the variable at import time
        from ray._private import ray_logging

        extra = re.compile(pattern)
        for dedup in (ray_logging.stdout_deduplicator, ray_logging.stderr_deduplicator):
            old = dedup.skip_re
            dedup.skip_re = extra if old is None else re.compile(f"{old.pattern}|{pattern}")
    except (ImportError, AttributeError):  # a Ray without these internals: its lines stay
        pass
    logging.getLogger("ray.experimental.tqdm_ray").setLevel(logging.ERROR)  # "tqdm is not installed"
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # per-dataset INFO lines (plans, sinks)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled"
    # "token authentication is enabled/disabled for this cluster": Ray's default for a local instance
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    dataset_log = logging.getLogger("ray.data.dataset")
    if _NO_CPU_WARNING not in dataset_log.filters:
        dataset_log.addFilter(_NO_CPU_WARNING)


def init_ray(address: str | None = None, prestart_workers: bool = True, **local_kwargs: Any) -> None:
    """Join RAY_ADDRESS / --ray-address when given, else start (or reuse) a local Ray instance.

    ``prestart_workers=False``: a local instance starts no idle worker processes when the driver connects.
    The training job's every process is an actor with its own runtime_env (Ray Train's controller and
    workers), which never takes one of those: they only took CPU from Ray Train's start (adult, one
    worker, 2 epochs, twice each: 31.8 / 31.8 s with them, 30.2 / 27.4 s without). The scoring job keeps
    them: its warm-up tasks run in them."""
    quiet_ray()
    import ray
    import ray.data

    # a failed Ray Data task raises the task's own exception (as the ``.cause`` of Ray's wrapper),
    # not Ray Data's generic UserCodeException: pipeline.errors walks that chain to the exit code
    ctx = ray.data.DataContext.get_current()
    ctx.raise_original_map_exception = True
    ctx.print_on_execution_start = False  # the jobs log their own phases
    ctx.enable_progress_bars = False  # the scoring job draws its own (a bar on a terminal, lines in a log)
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    # S3 endpoint and region (never credentials) travel to the workers; inside a Ray Job the job's own
    # runtime_env already applies and Ray refuses to merge a second one with the same variables
    env_vars = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION") if k in os.environ}
    in_ray_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
    env_vars |= {k: os.environ.get(k, v) for k, v in WORKER_ENV.items()}
    runtime_env = {"env_vars": env_vars} if env_vars and not in_ray_job else None
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        log.info("starting a local Ray instance")
        # its processes inherit this environment, so no runtime_env: a job with one has its own worker
        # processes, started when its first task comes, instead of those Ray starts beside the raylet
        local_env = WORKER_ENV | LOCAL_RAY_ENV | ({} if prestart_workers else {"RAY_prestart_worker_first_driver": "0"})
        for k, v in local_env.items():
            os.environ.setdefault(k, v)
        ray.init(include_dashboard=False, **local_kwargs)
