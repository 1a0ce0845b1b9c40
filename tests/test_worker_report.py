"""WorkerReport counts what the store did with each outcome: a failed attempt
with attempts left is ``retried``, the last one ``failed``."""

from __future__ import annotations

from taskspace import Space


def test_the_report_counts_the_last_failed_attempt_as_failed(space: Space) -> None:
    @space.task(name="always_fails", max_attempts=2, retry_backoff=0.0)
    def always_fails() -> None:
        raise ValueError("no")

    @space.task(name="fine")
    def fine() -> int:
        return 1

    handles = [always_fails.submit() for _ in range(3)] + [fine.submit()]
    report = space.run_worker(burst=True, concurrency=2)
    assert [h.status() for h in handles] == ["failed"] * 3 + ["succeeded"]
    assert (report.succeeded, report.retried, report.failed) == (1, 3, 3)
