"""One attempt of one task: decoding, running in its isolation, and its Outcome.

Isolation:

- ``thread``: a pool thread. A timeout cannot stop a Python thread, so the
  worker gives up on it: the attempt is recorded as timed out, its slot is
  freed and its cancel flag set; whatever it returns later is discarded.
- ``async``: the worker's event loop, under ``asyncio.wait_for`` (a real
  cancellation at the timeout, and at a cancel request).
- ``process``: a forked child process per attempt; a timeout or a cancel
  with ``terminate`` SIGKILLs it, a plain cancel request SIGTERMs it. The
  child reports progress and its result over a pipe and never touches the
  store.

An attempt whose lease was lost is abandoned: whatever cancellation it ends
with is never recorded as ``cancelled`` (the task is requeued by lease
expiry, or already runs elsewhere).

Rate limits (the task option ``rate_limit=``, see
:mod:`taskspace.coordination.ratelimit`): before the task's code runs (in the
worker process, also for ``process`` isolation), :func:`admit` takes a
concurrency slot if the limiter has one (waiting at most GATE_SLOT_WAIT_S)
and charges one unit to every limit with ``limiter.reserve(task id)``. Within
GATE_SLEEP_S of the budget the attempt sleeps and runs; later, the task goes
back to the queue (a ``release``: no attempt spent) until GATE_RETURN_EARLY_S
before its reserved moment; its next claim sleeps to that moment and runs it
without charging again. So each waiting task is deferred once, in claim
order, and a spent budget never makes tasks spin through the queue; one that
comes back too late (its worker was busy) is decided afresh, never started
in a bunch with others. The task's ``timeout`` counts from the moment the
gate admits it, and an attempt settled or abandoned while in the gate never
runs its code. When the store fails during the check the task is released
for GATE_RETRY_S (never run unchecked). A task that raises RateLimited is
released after ``retry_after`` (or its retry backoff when None) keeping the
error, ``max_rate_limited`` times in a row at most; past that each one is an
ordinary retry (an attempt spent).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from taskspace import logs
from taskspace.backends.base import MAX_DURATION_S, ErrorInfo, Lease, Outcome, TaskRecord
from taskspace.codec import Codec, decoder_for
from taskspace.coordination.ratelimit import Permit, RateLimiter, escape
from taskspace.errors import (
    BackendError,
    ConfigError,
    ProcessDied,
    RateLimited,
    Retry,
    SerializationError,
    TaskCancelled,
    TaskTimeout,
    UnknownTask,
)
from taskspace.tasks.context import TaskContext, bind, unbind
from taskspace.tasks.retry import backoff_delay
from taskspace.tasks.task import Task

PROCESS_POLL_S = 0.05
PR_SET_PDEATHSIG = 1
# Rate-limited tasks (see the module docstring).
GATE_SLEEP_S = 0.5
GATE_RETURN_EARLY_S = GATE_SLEEP_S / 2
GATE_SLOT_WAIT_S = 5.0
GATE_RETRY_S = 1.0
# A task process waits this long at most for its submitted events to be stored.
CHILD_EVENTS_FLUSH_S = 1.0

log = logging.getLogger("taskspace.worker")


def error_info(exc: BaseException, tb: str | None = None) -> ErrorInfo:
    """The stored form of an exception: its type, message and traceback."""
    text = tb if tb is not None else "".join(traceback.format_exception(exc))
    return {"type": type(exc).__qualname__, "message": str(exc), "traceback": text}


def decode_call(record: TaskRecord, allow_pickle: bool) -> tuple[list[Any], dict[str, Any]]:
    """The positional and keyword arguments stored in a task's payload."""
    data = decoder_for(record.codec, allow_pickle=allow_pickle).decode(record.payload)
    if (
        not isinstance(data, list)
        or len(data) not in (1, 2)
        or not isinstance(data[0], list)
        or (len(data) == 2 and not isinstance(data[1], dict))
    ):
        raise SerializationError(f"task {record.id} payload is not [args] or [args, kwargs]")
    return data[0], (data[1] if len(data) == 2 else {})


@dataclass(eq=False)
class Attempt:
    """A claimed task in flight on this worker."""

    record: TaskRecord
    task: Task[Any, Any]
    ctx: TaskContext
    deadline: float | None
    started: bool = False
    settled: bool = False
    lost: bool = False
    timed_out: bool = False
    process: multiprocessing.process.BaseProcess | None = None
    aio_task: asyncio.Task[Any] | None = None
    cancel_sent: bool = False  # the cancel request reached the code (asyncio, SIGTERM)
    began: float = 0.0  # monotonic start, for the duration in the log
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def lease(self) -> Lease:
        """The lease of this attempt; it keys the attempt (a task re-claimed by the
        same worker after a pause has two attempts, with different tokens)."""
        return self.record.lease


def outcome_for_error(attempt: Attempt, exc: BaseException, tb: str | None = None) -> Outcome:
    """How a raised exception ends the attempt: retry with backoff (the store
    turns it into ``failed`` once attempts are exhausted), or final."""
    ctx = attempt.ctx
    cancel = ctx.cancel_requested or ctx.lease_lost  # the worker abandons the latter
    if isinstance(exc, TaskCancelled | asyncio.CancelledError) and cancel:
        return Outcome("cancelled", error=error_info(exc, tb))
    if isinstance(exc, SerializationError | UnknownTask):
        return Outcome("failed", error=error_info(exc, tb))
    if isinstance(exc, Retry):
        return Outcome("retry", error=error_info(exc, tb), delay=exc.countdown)
    if isinstance(exc, RateLimited):
        return rate_limited_outcome(attempt, exc, tb)
    return Outcome("retry", error=error_info(exc, tb), delay=_backoff(attempt))


def _backoff(attempt: Attempt) -> float:
    opts = attempt.task.opts
    return backoff_delay(
        attempt.record.attempts, opts.retry_backoff, opts.retry_backoff_max, opts.retry_jitter
    )


def rate_limited_outcome(attempt: Attempt, exc: RateLimited, tb: str | None = None) -> Outcome:
    """A task raised RateLimited: back to the queue after ``retry_after`` (its
    backoff when None) without spending an attempt, counting the consecutive
    times in its error (``rate_limited``); past the task's
    ``max_rate_limited`` the retry spends an attempt like any error."""
    previous = attempt.record.error or {}
    count = int(previous.get("rate_limited", 0)) + 1
    after = exc.retry_after
    if isinstance(after, int | float) and math.isfinite(after) and after >= 0:
        delay = min(float(after), MAX_DURATION_S)
    else:
        delay = _backoff(attempt)
    error = {**error_info(exc, tb), "rate_limited": count}
    if count <= attempt.task.opts.max_rate_limited:
        return Outcome("release", error=error, delay=delay)
    return Outcome("retry", error=error, delay=delay)


_limiters: weakref.WeakKeyDictionary[Any, dict[str, RateLimiter]] = weakref.WeakKeyDictionary()
_limiters_lock = threading.Lock()


def task_limiter_name(task_name: str) -> str:
    """The name of the limiter a task's ``rate_limit="10/s"`` (or dict) makes:
    ``task:<task name>`` (a '/', '%' or whitespace in the name escaped)."""
    return "task:" + escape(task_name)


def limiter_for(task: Task[Any, Any]) -> RateLimiter | None:
    """The RateLimiter of a task's ``rate_limit`` option on the task's Space
    (one per Space and task, so its view of the store is reused), or None."""
    spec = task.opts.rate_limit
    if spec is None:
        return None
    with _limiters_lock:
        mine = _limiters.setdefault(task.space, {})
        limiter = mine.get(task.name)
        if limiter is None:
            own = task_limiter_name(task.name)
            if isinstance(spec, RateLimiter):
                limiter = spec if spec.space is task.space else spec.bound_to(task.space)
            elif isinstance(spec, str):
                limiter = RateLimiter(task.space, own, spec)
            else:
                limiter = RateLimiter(task.space, own, limits=spec)
            mine[task.name] = limiter
    return limiter


def admit(attempt: Attempt) -> tuple[Permit | None, Outcome | None]:
    """The task's rate limit for this attempt: ``(permit, None)`` to run it
    (holding the permit's concurrency slot, if any, until it ends; no
    permit: no rate limit), or ``(None, outcome)`` that sends it back to the
    queue (or fails it, if its limiter can never admit it)."""
    limiter = limiter_for(attempt.task)
    if limiter is None:
        return None, None
    lease = None
    try:
        if limiter.concurrency is not None:
            lease = limiter.slot(GATE_SLOT_WAIT_S)
            if lease is None:
                return None, Outcome("release", delay=GATE_RETRY_S)
        reserved = limiter.reserve(attempt.record.id, hold_after=GATE_SLEEP_S)
        if reserved.charged and not reserved.held:
            if reserved.delay > 0:
                time.sleep(reserved.delay)
            return Permit(limiter, limiter.costs(1), reserved.at, lease), None
        _give_back(lease)
        # Back a little early: the next claim sleeps to the moment instead of missing it.
        early = GATE_RETURN_EARLY_S if reserved.charged else 0.0
        return None, Outcome("release", delay=max(0.0, reserved.delay - early))
    except ConfigError as exc:
        _give_back(lease)
        return None, Outcome("failed", error=error_info(exc, tb=""))
    except BackendError as exc:
        _give_back(lease)
        log.warning("rate limit of task %s not checked, released for %.1f s: %s",
                    attempt.record.id, GATE_RETRY_S, exc)  # fmt: skip
        return None, Outcome("release", delay=GATE_RETRY_S)


def begin(attempt: Attempt, deadline: bool) -> bool:
    """Past the gate, just before the task's code: start its timeout clock
    (``deadline``: the worker enforces it; async attempts use wait_for).
    False if the attempt was settled or abandoned meanwhile: its code must
    not run (the task is already retried, or runs elsewhere)."""
    with attempt.lock:
        if attempt.settled or attempt.ctx.lease_lost:
            return False
        timeout = attempt.record.timeout
        if deadline and timeout is not None:
            attempt.deadline = time.monotonic() + timeout
        return True


def _give_back(what: Any) -> None:
    """Release a permit or slot; a store failure only delays its return (TTL)."""
    if what is None:
        return
    try:
        what.release()
    except Exception:  # a slot not given back returns when its lease expires
        log.warning("rate limit slot not released (it returns at its TTL)", exc_info=True)


def _give_back_late(gate: asyncio.Future[tuple[Permit | None, Outcome | None]]) -> None:
    """A gate whose caller was cancelled: give back what it admitted, off the loop."""
    if gate.cancelled() or gate.exception() is not None:
        return
    permit = gate.result()[0]
    if permit is not None:
        threading.Thread(target=_give_back, args=(permit,), name="taskspace-gate").start()


def timeout_outcome(attempt: Attempt) -> Outcome:
    """The outcome of an attempt that ran past its timeout (retried like an error)."""
    exc = TaskTimeout(
        f"task {attempt.task.name} exceeded its timeout of {attempt.record.timeout} s"
    )
    return outcome_for_error(attempt, exc, tb="")


def success(codec: Codec, value: Any) -> Outcome:
    """A succeeded outcome, or failed if the value cannot be encoded."""
    try:
        return Outcome("succeeded", result=codec.encode(value, "result"))
    except SerializationError as exc:
        return Outcome("failed", error=error_info(exc))


def run_inline(
    attempt: Attempt, args: list[Any], kwargs: dict[str, Any], codec: Codec
) -> Outcome | None:
    """Run a sync task in the calling thread once its rate limit admits it,
    its timeout counted from then; None if the attempt was settled or
    abandoned before its code could run (it does not run)."""
    permit, refused = admit(attempt)
    if refused is not None:
        return refused
    try:
        if not begin(attempt, deadline=True):
            return None
        return call_inline(attempt, args, kwargs, codec)
    finally:
        _give_back(permit)


def call_inline(attempt: Attempt, args: list[Any], kwargs: dict[str, Any], codec: Codec) -> Outcome:
    """Run a sync task in the calling thread with its context bound."""
    token = bind(attempt.ctx)
    try:
        return success(codec, attempt.task.fn(*args, **kwargs))
    except BaseException as exc:  # noqa: BLE001 - whatever the task raises is its outcome
        return outcome_for_error(attempt, exc)
    finally:
        unbind(token)


async def run_coroutine(
    attempt: Attempt, args: list[Any], kwargs: dict[str, Any], codec: Codec
) -> Outcome | None:
    """Run an async task on the worker's loop once its rate limit admits it
    (checked off the loop), cancelling it at its timeout counted from then;
    None if the attempt was settled or abandoned before its code could run. A
    cancellation in the gate ends the attempt there (a permit it got late is
    given back)."""
    permit: Permit | None = None
    if attempt.task.opts.rate_limit is not None:
        gate = asyncio.ensure_future(asyncio.to_thread(admit, attempt))
        try:
            permit, refused = await asyncio.shield(gate)
        except asyncio.CancelledError as exc:
            gate.add_done_callback(_give_back_late)
            return outcome_for_error(attempt, exc)
        if refused is not None:
            return refused
    if not begin(attempt, deadline=False):
        if permit is not None:
            await asyncio.to_thread(_give_back, permit)
        return None
    token = bind(attempt.ctx)
    try:
        value = await asyncio.wait_for(attempt.task.fn(*args, **kwargs), attempt.record.timeout)
        return success(codec, value)
    except TimeoutError:
        return timeout_outcome(attempt)
    except BaseException as exc:  # noqa: BLE001 - whatever the task raises is its outcome
        return outcome_for_error(attempt, exc)
    finally:
        unbind(token)
        if permit is not None:
            await asyncio.to_thread(_give_back, permit)


def _die_with_parent(parent_pid: int) -> None:
    """Make the kernel SIGKILL this child if its worker dies (even by SIGKILL):
    an orphaned attempt would keep running while the task is retried elsewhere."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _child_main(
    conn: multiprocessing.connection.Connection,
    attempt: Attempt,
    args: list[Any],
    kwargs: dict[str, Any],
    codec: Codec,
    parent_pid: int,
) -> None:
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Progress, usage and log records go to the worker over the pipe (the child
    # never touches the store); a lock keeps messages of the task's threads whole.
    sending = threading.Lock()

    def send(message: tuple[Any, ...]) -> None:
        with sending:
            conn.send(message)

    attempt.ctx._report = lambda done, total: send(("progress", done, total))
    attempt.ctx._usage = lambda usage: send(("usage", usage))
    logs.set_fork_sink(lambda payload: send(("log", payload)))
    outcome = call_inline(attempt, args, kwargs, codec)  # the parent checked the rate limit
    logs.end_task_output(attempt.ctx)
    logs.set_fork_sink(None)
    # The child exits with os._exit (no atexit): store the "submitted" events of
    # tasks it submitted before it goes (bounded).
    submitted = attempt.task.space._facades.get("events")
    if submitted is not None:
        submitted.flush(CHILD_EVENTS_FLUSH_S)
    send(("outcome", outcome))
    conn.close()
    os._exit(0)


def run_in_process(
    attempt: Attempt,
    args: list[Any],
    kwargs: dict[str, Any],
    codec: Codec,
    report: Callable[[float, float], None],
) -> Outcome | None:
    """Run a task in a forked child, once its rate limit admits it; None if the
    worker killed it (timeout, cancel)."""
    permit, refused = admit(attempt)
    if refused is not None:
        return refused
    try:
        if not begin(attempt, deadline=True):
            return None
        return _run_child(attempt, args, kwargs, codec, report)
    finally:
        _give_back(permit)


def _run_child(
    attempt: Attempt,
    args: list[Any],
    kwargs: dict[str, Any],
    codec: Codec,
    report: Callable[[float, float], None],
) -> Outcome | None:
    mp = multiprocessing.get_context("fork")
    parent, child = mp.Pipe(duplex=False)
    proc = mp.Process(
        target=_child_main, args=(child, attempt, args, kwargs, codec, os.getpid()), daemon=True
    )
    usage = attempt.ctx._usage
    # A store that must not be mid-write at a fork (SQLite) provides a guard.
    fork_guard = getattr(attempt.task.space.store, "fork_guard", None)
    with attempt.lock:
        if attempt.settled:
            return None
        with fork_guard() if fork_guard is not None else contextlib.nullcontext():
            proc.start()
        attempt.process = proc
    child.close()
    try:
        while True:
            if parent.poll(PROCESS_POLL_S):
                try:
                    message = parent.recv()
                except EOFError:
                    break
                if message[0] == "progress":
                    report(message[1], message[2])
                    continue
                if message[0] == "log":
                    logs.ship_payload(attempt.ctx.worker, message[1])
                    continue
                if message[0] == "usage":
                    if usage is not None:
                        usage(message[1])
                    continue
                outcome: Outcome = message[1]
                return outcome
            if not proc.is_alive() and not parent.poll(0):
                break
    finally:
        proc.join(timeout=5)
        parent.close()
    if attempt.settled:
        return None
    died = ProcessDied(f"task process exited with code {proc.exitcode} before reporting")
    return outcome_for_error(attempt, died, tb="")


def kill_process(attempt: Attempt) -> None:
    """SIGKILL the attempt's child process, if it has one and it still runs."""
    proc = attempt.process
    if proc is not None and proc.is_alive() and proc.pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)


def prepare(
    record: TaskRecord, task: Task[Any, Any] | None, allow_pickle: bool
) -> tuple[list[Any], dict[str, Any]] | Outcome:
    """Arguments for the attempt, or a final failed outcome if it cannot run here."""
    if task is None:
        return Outcome("failed", error=error_info(UnknownTask(record.name), tb=""))
    try:
        return decode_call(record, allow_pickle)
    except SerializationError as exc:
        return Outcome("failed", error=error_info(exc, tb=""))


def signal_process(attempt: Attempt, sig: signal.Signals) -> bool:
    """Send ``sig`` to the attempt's child process; True if it was sent."""
    proc = attempt.process
    if proc is None or proc.pid is None or not proc.is_alive():
        return False
    try:
        os.kill(proc.pid, sig)
    except ProcessLookupError:
        return False
    return True


def after_cancel(attempt: Attempt, outcome: Outcome) -> Outcome:
    """A process attempt that ended without a result after a cancel request (its
    child was signalled, or stopped on its own) ends ``cancelled``, not retried."""
    if not attempt.ctx.cancel_requested or outcome.kind not in ("retry", "failed"):
        return outcome
    exc = TaskCancelled(attempt.record.id, "cancelled", "TaskCancelled", "cancel requested")
    return Outcome("cancelled", error=error_info(exc, tb=""))
