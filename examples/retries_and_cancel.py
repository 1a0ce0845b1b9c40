"""Retries, a task that gives up, cancelling and retrying by hand, on memory://.

Run: python examples/retries_and_cancel.py
"""

from __future__ import annotations

from taskspace import Retry, Space, TaskCancelled, TaskFailed, current_task

space = Space("memory://examples")
calls = {"flaky": 0}


@space.task(max_attempts=3, retry_backoff=0.01)
def flaky(x: int) -> int:
    """Fails twice, then succeeds: retried with backoff by the worker."""
    calls["flaky"] += 1
    if calls["flaky"] < 3:
        raise ConnectionError("model endpoint busy")
    return x * 2


@space.task(max_attempts=2)
def rate_limited() -> str:
    """Asks for a retry on purpose, then gives up on the last attempt."""
    if current_task().attempt < 2:
        raise Retry(countdown=0.01)
    raise ValueError("quota exhausted")


@space.task
def never_runs() -> None:
    raise AssertionError("cancelled before it ran")


def main() -> None:
    ok = flaky.submit(21)
    gave_up = rate_limited.submit()
    doomed = never_runs.options(countdown=60).submit()
    print("cancel:", doomed.cancel())
    space.run_worker(burst=True, install_signal_handlers=False)
    print("flaky:", ok.result(timeout=10), "after", ok.info().attempts, "attempts")
    try:
        gave_up.result(timeout=10)
    except TaskFailed as exc:
        print("rate_limited:", exc.status, exc.remote_type, exc.remote_message)
    try:
        doomed.result(timeout=10)
    except TaskCancelled:
        print("never_runs: cancelled")
    print("retry by hand:", gave_up.retry(), "attempts now", gave_up.info().attempts)
    failed = space.tasks(state="queued")
    assert [r.id for r in failed] == [gave_up.id]


if __name__ == "__main__":
    main()
