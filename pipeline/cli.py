"""The ``vaepipe`` console script: one subcommand per job module in ``jobs/``."""

from __future__ import annotations

import gc
import importlib
import sys

# subcommand -> (module, one-line help)
COMMANDS = {
    "infer-spec": ("jobs.infer_spec", "print a feature spec inferred from Parquet data"),
    "train": ("jobs.train", "train the VAE with Ray Train; writes the model artifact"),
    "score": ("jobs.score", "score every record into the scores table partition for a run date"),
    "query": ("jobs.query", "SQL over the scores table (named `scores`), printed or written as csv/json/parquet"),
    "report": ("jobs.report", "one self-contained HTML report on a model and a scoring run"),
    "check": ("jobs.check", "compare a run's log_marginal with the model's validation reference; exit 4 on drift"),
    "demo": ("jobs.demo", "the whole job on generated data: train, score, find the planted anomalies"),
}


def usage() -> str:
    lines = ["usage: vaepipe COMMAND [options]   (vaepipe COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from pipeline.runtime import retain_freed_memory

    retain_freed_memory()  # the console script's process is vaepipe's own (the API leaves its caller's alone)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        import pipeline

        print(f"vaepipe {pipeline.__version__}")
        return 0
    name = argv[0]
    if name not in COMMANDS:
        print(f"vaepipe: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return module.main(argv[1:])


def run() -> None:
    """The console script: :func:`main`, then exit with its code. Every object still alive is frozen first
    (``gc.freeze``), so the interpreter's last garbage collections at exit skip the heap that torch, Ray and
    the job leave behind instead of walking all of it to free memory the process is about to give back:
    from the last exit handler to the process's end, 1.1 s -> 0.2 s on a 2-core machine (``vaepipe train``,
    adult, 2 epochs; torch imported alone: 0.39 -> 0.12 s). The exit handlers (Ray's shutdown among them)
    still run."""
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    run()
