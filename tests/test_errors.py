"""One path from a failure to the exit code: the cause chain through Ray's wrapper, and the test hook."""

from __future__ import annotations

import pytest
from ray.exceptions import RayTaskError

from pipeline.errors import (
    FAIL_AT_ENV,
    FailureHook,
    InjectedFailure,
    InputDataError,
    root_message,
    vaepipe_error_in,
)
from pipeline.runtime import job_main, make_parser


def _as_ray_task_error(inner: BaseException) -> BaseException:
    """What a driver receives when a Ray task raised `inner` (Ray's own wrapper class)."""
    try:
        raise inner
    except BaseException as e:
        return RayTaskError("task", "Traceback ...\nSomething: not this line", e).as_instanceof_cause()


def test_the_error_a_ray_task_raised_is_found_through_the_wrapper():
    bad = InputDataError("value out of range", file="s3://b/part-1.parquet", column="amount")
    wrapped = _as_ray_task_error(bad)
    try:
        raise RuntimeError("the dataset failed") from wrapped
    except RuntimeError as outer:
        assert vaepipe_error_in(outer) is bad
    assert vaepipe_error_in(_as_ray_task_error(KeyError("x"))) is None
    assert root_message(_as_ray_task_error(ValueError("first\nsecond"))) == "ValueError: first"


def test_job_main_maps_a_wrapped_failure_to_its_exit_code_and_one_line(capsys):
    def run(args):
        raise RuntimeError("outer") from _as_ray_task_error(
            InputDataError("not a number", file="a.parquet", column="age")
        )

    main = job_main(lambda: make_parser("t", "t"), run)
    assert main([]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: not a number (column 'age', file a.parquet)"]

    def crash(args):
        raise RuntimeError("wrapper") from _as_ray_task_error(ZeroDivisionError("division by zero"))

    assert job_main(lambda: make_parser("t", "t"), crash)([]) == 1
    assert capsys.readouterr().err.strip().splitlines() == ["error: ZeroDivisionError: division by zero"]


def test_the_failure_hook_fires_at_its_steps_once_per_marker(tmp_path, monkeypatch):
    monkeypatch.setenv(FAIL_AT_ENV, "1 3")
    hook = FailureHook.from_dict(FailureHook.from_env(marker=str(tmp_path / "m")).to_dict())
    hook.check(0, "epoch")
    with pytest.raises(InjectedFailure, match="epoch 1"):
        hook.check(1, "epoch")
    hook.check(1, "epoch")  # fired once already: the marker says so
    with pytest.raises(InjectedFailure, match="epoch 3"):
        hook.check(3, "epoch")
    unmarked = FailureHook.from_env()
    for _ in range(2):  # without a marker it fires every time the step comes round
        with pytest.raises(InjectedFailure):
            unmarked.check(1, "batch")
    monkeypatch.delenv(FAIL_AT_ENV)
    FailureHook.from_env().check(1, "batch")
