"""The elected maintainer, in this process, on every backend: maintain()'s steps
and their guards, one maintainer among workers, an immediate handover when the
maintainer stops, a burst worker that drains while someone else holds the
term, and the maintainer settings' validation (config and CLI)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from taskspace import ConfigError, Space, Worker, WorkerConfig
from taskspace.cli import main
from taskspace.coordination import periodic, registry
from taskspace.worker import maintainer as maintainer_mod
from taskspace.worker.maintainer import ELECTION, maintain
from tests.conftest import backend_url

REPO_ROOT = Path(__file__).resolve().parents[1]
ORDER = ["requeue_expired", "promote_due", "fire_due", "maintain_registry", "reap", "kv.reap"]


@pytest.fixture
def shared_url(backend: str, tmp_path: Path) -> str:
    """A URL several Spaces of this process share (memory: by name)."""
    if backend == "memory":
        return f"memory://maint-{uuid.uuid4().hex[:8]}"
    return backend_url(backend, tmp_path)


class Running:
    """A worker on a thread of this process."""

    def __init__(self, space: Space, **options: Any) -> None:
        options.setdefault("maintenance_interval", 0.05)
        options.setdefault("heartbeat_interval", 0.2)
        options.setdefault("idle_wait", 0.05)
        options.setdefault("maintainer_ttl", 1.0)
        options.setdefault("maintainer_retry", 1.0)
        self.worker = Worker(space, WorkerConfig(install_signal_handlers=False, **options))
        self.report: Any = None
        self.thread = threading.Thread(target=self._run, name="test-worker")
        self.thread.start()

    def _run(self) -> None:
        self.report = self.worker.run()

    @property
    def leading(self) -> bool:
        return self.worker.maintainer.leading

    def stop(self) -> None:
        self.worker.stop(grace=1.0)
        self.thread.join(10)
        assert not self.thread.is_alive()


@pytest.fixture
def running() -> Iterator[Callable[..., Running]]:
    started: list[Running] = []

    def start(space: Space, **options: Any) -> Running:
        run = Running(space, **options)
        started.append(run)
        return run

    yield start
    for run in started:
        if run.thread.is_alive():
            run.stop()


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.01)


# -- maintain() ---------------------------------------------------------------------


def record_steps(monkeypatch: pytest.MonkeyPatch, space: Space, fail: str = "") -> list[str]:
    """Every step of a pass appends its name; the step named ``fail`` raises."""
    calls: list[str] = []

    def step(name: str, value: Any) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            if name == fail:
                raise RuntimeError(f"{name} broke")
            return value

        return run

    queue, kv = space.store.queue, space.store.kv
    monkeypatch.setattr(queue, "requeue_expired", step("requeue_expired", 0))
    monkeypatch.setattr(queue, "promote_due", step("promote_due", 0))
    monkeypatch.setattr(periodic, "fire_due", step("fire_due", 0))
    monkeypatch.setattr(registry, "maintain_registry", step("maintain_registry", None))
    monkeypatch.setattr(queue, "reap", step("reap", 0))
    monkeypatch.setattr(kv, "reap", step("kv.reap", 0))
    return calls


@pytest.mark.parametrize("fail", ORDER)
def test_maintain_runs_every_step_in_order_and_a_failing_one_stops_none(
    space: Space, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, fail: str
) -> None:
    calls = record_steps(monkeypatch, space, fail=fail)
    assert maintain(space) == len(ORDER)
    assert calls == ORDER
    failed = [r.getMessage() for r in caplog.records if "broke" in r.getMessage()]
    assert len(failed) == 1 and fail in failed[0], failed


class FlippingTerm:
    """A term that turns inactive after ``steps`` checks."""

    def __init__(self, steps: int) -> None:
        self.left = steps

    @property
    def active(self) -> bool:
        self.left -= 1
        return self.left >= 0


def test_maintain_stops_at_once_when_the_term_is_lost(
    space: Space, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = record_steps(monkeypatch, space)
    assert maintain(space, term=FlippingTerm(2)) == 2  # type: ignore[arg-type]
    assert calls == ORDER[:2]


def test_maintain_gives_its_store_and_on_time_to_fire_due(
    space: Space, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker's injected store reaches the periodic step, as the queue and KV ones."""
    seen: list[tuple[Any, Any]] = []
    monkeypatch.setattr(
        periodic, "fire_due", lambda s, **o: seen.append((o.get("store"), o.get("on_time")))
    )
    injected = space.store  # any store object other than None
    maintain(space, store=injected, on_time=42.0)
    assert seen == [(injected, 42.0)]


def test_on_time_covers_the_failover_bound() -> None:
    assert maintainer_mod.on_time_for(WorkerConfig()) == periodic.ON_TIME_S >= 10 + 2 + 2
    config = WorkerConfig(maintainer_ttl=60, maintainer_retry=5, maintenance_interval=2)
    assert maintainer_mod.on_time_for(config) == 69


def test_maintain_reaps_in_bounded_batches(space: Space, monkeypatch: pytest.MonkeyPatch) -> None:
    sizes: list[int] = []

    def reap(limit: int = 1000) -> int:
        sizes.append(limit)
        return limit  # a backlog: every batch is full

    monkeypatch.setattr(space.store.queue, "reap", reap)
    maintain(space)
    assert sizes == [maintainer_mod.REAP_BATCH] * maintainer_mod.REAP_BATCHES_PER_PASS


# -- the maintainer among workers ---------------------------------------------------------


def test_one_maintainer_among_workers_and_an_immediate_handover(
    shared_url: str, running: Callable[..., Running]
) -> None:
    spaces = [Space(shared_url) for _ in range(3)]
    workers = [running(space, name=f"w{i}") for i, space in enumerate(spaces)]
    try:
        wait_until(lambda: any(w.leading for w in workers), 5, "a maintainer")
        time.sleep(0.5)  # a few passes; the others keep campaigning meanwhile
        leaders = [w for w in workers if w.leading]
        assert len(leaders) == 1
        first = leaders[0]
        assert first.worker.maintainer.passes >= 3
        assert [w.worker.maintainer.passes for w in workers if w is not first] == [0, 0]
        election = spaces[0].election(ELECTION)
        identity, term = election.leader() or ("", 0)
        assert identity == first.worker.name
        began = time.monotonic()
        first.stop()  # resigns: another takes over at once, not after the TTL
        wait_until(lambda: any(w.leading for w in workers if w is not first), 5, "a successor")
        handover = time.monotonic() - began
        assert handover < 1.0, f"handover took {handover:.2f} s"
        second = next(w for w in workers if w.leading)
        assert (election.leader() or ("", 0))[1] > term
        wait_until(lambda: second.worker.maintainer.passes > 0, 5, "the successor's first pass")
        print(f"maintainer handover on graceful stop: {handover:.3f} s")
    finally:
        for run in workers:  # before their Spaces close under them
            if run.thread.is_alive():
                run.stop()
        for space in spaces:
            space.close()


def test_the_maintainer_requeues_a_dead_workers_task(
    space: Space, running: Callable[..., Running]
) -> None:
    @space.task(lease=0.5, max_attempts=3)
    def job() -> str:
        return "ran"

    handle = job.submit()
    claimed = space.store.queue.claim(["default"], "dead-worker", 1)  # then it "dies"
    assert [r.id for r in claimed] == [handle.id]
    run = running(space)
    assert handle.result(timeout=10) == "ran"
    record = handle.info()
    assert (record.attempts, record.lost) == (2, 1)
    assert run.worker.maintainer.passes > 0
    run.stop()


@pytest.mark.timeout(30)  # without its own requeue, the burst worker would never drain
def test_a_burst_worker_requeues_expired_leases_while_another_holds_the_term(
    space: Space,
) -> None:
    """Someone else is the maintainer (and does nothing): a burst worker still gets
    a dead worker's expired lease requeued, runs the task and drains."""

    @space.task(lease=0.3, max_attempts=3)
    def job() -> str:
        return "ran"

    other = space.election(ELECTION).campaign(identity="idle-maintainer", ttl=30)
    try:
        handle = job.submit()
        assert space.store.queue.claim(["default"], "dead-worker", 1)
        began = time.monotonic()
        report = space.run_worker(
            burst=True, install_signal_handlers=False, idle_wait=0.05,
            maintainer_ttl=1.0, maintainer_retry=1.0,
        )  # fmt: skip
        took = time.monotonic() - began
        assert report.succeeded == 1 and handle.result(timeout=0) == "ran"
        assert took < 5.0, f"the burst worker took {took:.1f} s"
        assert other.active  # it never took the term
    finally:
        other.resign()


@pytest.mark.timeout(30)
def test_a_worker_fires_its_own_schedules_while_a_foreign_maintainer_leads(
    space: Space, running: Callable[..., Running], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The maintainer is a worker of another app (it has no schedule): a worker that
    defines the schedule fires its ticks itself, about one pass per tick."""

    @space.periodic(every=1, name="own-beat")
    def beat() -> int:
        return 1

    passes: list[float] = []
    real = periodic.fire_due

    def counting(*args: Any, **kwargs: Any) -> int:
        passes.append(time.monotonic())
        return real(*args, **kwargs)

    monkeypatch.setattr(periodic, "fire_due", counting)
    other = space.election(ELECTION).campaign(identity="other-app", ttl=30)
    try:
        run = running(space)
        fired = lambda: [r for r in space.iter_tasks(name="own-beat") if r.state == "succeeded"]  # noqa: E731
        wait_until(lambda: len(fired()) >= 3, 10, "three ticks to fire and run")
        began = time.monotonic()
        time.sleep(2.0)
        during = [t for t in passes if t >= began]
        assert not run.leading and other.active
        assert len(during) <= 2 * 2 + 2, f"{len(during)} fire_due passes in 2 s"
        ticks = sorted(int(r.id.rsplit(":", 1)[1]) for r in space.iter_tasks(name="own-beat"))
        assert ticks == list(range(ticks[0], ticks[0] + len(ticks)))  # none skipped
    finally:
        other.resign()


def test_maintainer_settings_are_validated() -> None:
    config = WorkerConfig()
    assert (config.maintainer_ttl, config.maintainer_retry) == (10.0, 2.0)
    assert WorkerConfig(maintainer_ttl=1, maintainer_retry=1.0).maintainer_ttl == 1
    for name in ("maintainer_ttl", "maintainer_retry"):
        for bad in (0.5, 0, -1, "2", True, float("nan"), None):
            with pytest.raises(ConfigError, match=name):
                WorkerConfig(**{name: bad})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "name",
    ["shutdown_grace", "maintenance_interval", "heartbeat_interval", "idle_wait",
     "maintainer_ttl", "maintainer_retry"],
)  # fmt: skip
def test_every_worker_duration_refuses_nan_inf_and_bools(name: str) -> None:
    """NaN would make the elected maintainer spin and maintain nothing, space-wide."""
    for bad in (float("nan"), float("inf"), -float("inf"), True, False, "1", -1):
        with pytest.raises(ConfigError, match=name):
            WorkerConfig(**{name: bad})
    assert getattr(WorkerConfig(**{name: 2}), name) == 2


def test_concurrency_refuses_bools() -> None:
    for bad in (True, False, 1.5, 0):
        with pytest.raises(ConfigError, match="concurrency"):
            WorkerConfig(concurrency=bad)  # type: ignore[arg-type]


def test_cli_worker_maintainer_options() -> None:
    result = CliRunner().invoke(main, ["worker", "--help"])
    assert "--maintainer-ttl" in result.output and "--maintainer-retry" in result.output
    done = subprocess.run(
        [sys.executable, "-m", "taskspace", "worker", "tests.faults.app:make_space",
         "--url", "memory://", "--maintainer-retry", "0.5"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert "maintainer_retry" in done.stderr and "0.5" in done.stderr
