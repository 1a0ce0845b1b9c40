"""The network between a client and Redis misbehaves (issue 6 items 9 and 12):
a claim delayed in the network must lease nothing once its retry came back, a
finish whose reply was lost is accepted once when retried, and a stalled
connection must not hold a call past its timeout."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from taskspace.backends.base import Gap, Outcome, TaskSpec
from taskspace.backends.redis import RedisStore
from taskspace.backends.redis.conn import BLOCK_MARGIN_S, READ_TIMEOUT_S
from taskspace.errors import BackendError
from tests.services import RedisServer


class Proxy:
    """A TCP proxy in front of Redis. ``hold(marker)``: the next client bytes
    containing ``marker`` (and everything after them on that connection) wait
    until ``release()``. ``stall=True``: connections are accepted and never
    forwarded, like a peer that stopped answering (set it after a store was
    opened to stall only the connections made from then on). ``lose(marker)``:
    the next client bytes containing ``marker`` reach Redis, but the
    connection is cut before the reply comes back."""

    def __init__(self, upstream_port: int, stall: bool = False) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.stall = stall
        self.held = threading.Event()
        self._marker: bytes | None = None
        self._lose: bytes | None = None
        self.lost = threading.Event()
        self._release = threading.Event()
        self._socks: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, namespace: str) -> str:
        return f"redis://127.0.0.1:{self.port}/0?namespace={namespace}"

    def hold(self, marker: bytes) -> None:
        self._marker = marker

    def lose(self, marker: bytes) -> None:
        self._lose = marker

    def release(self) -> None:
        self._release.set()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            self._socks.append(client)
            if self.stall:
                continue
            upstream = socket.create_connection(self.upstream)
            self._socks.append(upstream)
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, outbound: bool) -> None:
        try:
            while data := src.recv(65536):
                if outbound and self._marker is not None and self._marker in data:
                    self._marker = None
                    self.held.set()
                    self._release.wait(20)
                if outbound and self._lose is not None and self._lose in data:
                    self._lose = None
                    src.shutdown(socket.SHUT_RDWR)  # the client will never see a reply
                    dst.sendall(data)
                    time.sleep(0.2)  # Redis runs it before its connection closes
                    self.lost.set()
                    break
                dst.sendall(data)
        except OSError:
            pass  # either side went away: this connection is over
        finally:
            for s in (src, dst):
                s.close()

    def close(self) -> None:
        self._release.set()
        self._listener.close()
        for s in self._socks:
            s.close()


@pytest.fixture
def server() -> Iterator[RedisServer]:
    srv = RedisServer().start()
    yield srv
    srv.close()


def spec(**kw: object) -> TaskSpec:
    kw.setdefault("id", uuid.uuid4().hex)
    return TaskSpec(name="job", payload=b"[]", **kw)  # type: ignore[arg-type]


# -- item 9: a late claim leases nothing -----------------------------------------------


@pytest.mark.timeout(30)
def test_a_claim_delayed_in_the_network_leases_nothing_after_its_retry_came_back(
    server: RedisServer,
) -> None:
    namespace = f"t{uuid.uuid4().hex[:12]}"
    proxy = Proxy(server.port)
    delayed = RedisStore(proxy.url(namespace))
    direct = RedisStore(f"{server.url}?namespace={namespace}")
    try:
        assert direct.queue.claim(["default"], "w1", 1) == []  # loads the functions
        proxy.hold(direct.conn.function("claim").encode())
        late: list[object] = []
        original = threading.Thread(
            target=lambda: late.append(delayed.queue.claim(["default"], "w1", 1, request_id="r1"))
        )
        original.start()
        assert proxy.held.wait(5), "the claim never reached the proxy"
        # The worker gave up on the first call and retried it on a new connection.
        assert direct.queue.claim(["default"], "w1", 1, request_id="r1") == []
        (task_id,) = direct.queue.push([spec(max_attempts=1)])
        proxy.release()  # the original finally reaches Redis
        original.join(10)
        assert late == [[]], "the late duplicate of a claim leased a task"
        rec = direct.queue.get(task_id)
        assert rec is not None and rec.state == "queued" and rec.attempts == 0
        (rec,) = direct.queue.claim(["default"], "w1", 1, request_id="r2")
        assert direct.queue.finish([(rec.lease, Outcome("succeeded", result=b"1"))]) == [True]
        assert direct.queue.state(task_id) == "succeeded"
    finally:
        proxy.close()
        delayed.close()
        direct.close()


def test_a_repeated_claim_returns_what_the_first_leased_and_nothing_more(
    server: RedisServer,
) -> None:
    store = RedisStore(server.namespaced_url())
    try:
        store.queue.push([spec(), spec()])
        (first,) = store.queue.claim(["default"], "w", 1, request_id="r")
        (again,) = store.queue.claim(["default"], "w", 5, request_id="r")
        assert again.id == first.id and again.token == first.token
        assert store.queue.stats().counts["default"] == {"queued": 1, "running": 1}
    finally:
        store.close()


# -- contract v2: a finish whose reply was lost -------------------------------------


@pytest.mark.timeout(30)
def test_a_finish_whose_reply_was_lost_is_accepted_once_when_retried(
    server: RedisServer,
) -> None:
    namespace = f"t{uuid.uuid4().hex[:12]}"
    proxy = Proxy(server.port)
    worker = RedisStore(proxy.url(namespace))
    direct = RedisStore(f"{server.url}?namespace={namespace}")
    try:
        (task_id,) = direct.queue.push([spec()])
        (rec,) = worker.queue.claim(["default"], "w", 1)
        assert direct.queue.finish([]) == [] and direct.queue.get("x") is None
        done = Outcome("succeeded", result=b"42", followups=(spec(id="next"),))
        direct.conn.load_functions()  # no loading round through the proxy
        proxy.lose(direct.conn.function("finish").encode())
        try:
            first: list[bool] | None = worker.queue.finish([(rec.lease, done)])
        except BackendError:
            first = None  # the reply was lost (or the driver retried by itself)
        assert proxy.lost.wait(5), "the finish never went through the proxy"
        # Whatever the worker saw, its retry is answered True and changes nothing.
        assert worker.queue.finish([(rec.lease, done)]) == [True]
        assert first in (None, [True])
        got = direct.queue.get(task_id)
        assert got is not None and got.state == "succeeded" and got.result == b"42"
        stats = direct.queue.stats()
        assert stats.stale_finishes == 0
        assert stats.counts["default"] == {"succeeded": 1, "queued": 1}
    finally:
        proxy.close()
        worker.close()
        direct.close()


@pytest.mark.timeout(30)
def test_a_push_whose_reply_was_lost_adds_each_task_once_when_retried(
    server: RedisServer,
) -> None:
    namespace = f"t{uuid.uuid4().hex[:12]}"
    proxy = Proxy(server.port)
    client = RedisStore(proxy.url(namespace))
    direct = RedisStore(f"{server.url}?namespace={namespace}")
    try:
        direct.conn.load_functions()
        specs = [spec(), spec(dedup_key="once"), spec()]
        proxy.lose(direct.conn.function("push").encode())
        try:
            first: list[str] | None = client.queue.push(specs)
        except BackendError:
            first = None
        assert proxy.lost.wait(5), "the push never went through the proxy"
        ids = client.queue.push(specs)  # the caller's retry, same ids
        assert ids == [s.id for s in specs] and first in (None, ids)
        assert direct.queue.stats().counts["default"] == {"queued": 3}
        assert len(direct.queue.claim(["default"], "w", 10)) == 3
    finally:
        proxy.close()
        client.close()
        direct.close()


# -- item 12: a timeout is a promise, even behind a stalled connection -----------------


@pytest.fixture
def stalled(server: RedisServer) -> Iterator[RedisStore]:
    proxy = Proxy(server.port)
    store = RedisStore(proxy.url("stalled"))  # opening reads the space id
    proxy.stall = True  # every connection made from now on stalls
    yield store
    store.close()
    proxy.close()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("timeout", [0.2, 2.0])
def test_wait_for_finish_behind_a_stalled_connection_raises_within_its_timeout(
    stalled: RedisStore, timeout: float
) -> None:
    started = time.monotonic()
    with pytest.raises(BackendError):
        stalled.queue.wait_for_finish(["some-task"], timeout)
    assert time.monotonic() - started < max(timeout, READ_TIMEOUT_S) + 1.0


@pytest.mark.timeout(30)
def test_reads_behind_a_stalled_connection_raise_quickly(stalled: RedisStore) -> None:
    reads = (
        lambda: stalled.queue.get("x"), lambda: stalled.queue.state("x"), stalled.queue.stats,
        lambda: stalled.queue.get_many(["x"]), stalled.clock.now, stalled.check_space,
    )  # fmt: skip
    for read in reads:
        started = time.monotonic()
        with pytest.raises(BackendError):
            read()
        assert time.monotonic() - started < READ_TIMEOUT_S + 1.0


@pytest.mark.timeout(30)
def test_a_wait_blocks_for_its_timeout_then_returns(server: RedisServer) -> None:
    store = RedisStore(server.namespaced_url())
    try:
        (task_id,) = store.queue.push([spec()])
        store.queue.wait_for_finish([task_id], 0.1)  # connections made and scripts loaded
        for timeout in (0.3, READ_TIMEOUT_S + 1.0):  # also longer than the read timeout
            started = time.monotonic()
            store.queue.wait_for_finish([task_id], timeout)
            elapsed = time.monotonic() - started
            assert timeout - 0.05 <= elapsed < timeout + BLOCK_MARGIN_S
    finally:
        store.close()


# -- a stopped server: every wait fails within about its timeout ------------------------


@pytest.fixture
def stopped(server: RedisServer) -> Iterator[tuple[RedisStore, Any]]:
    """A store whose every wait path was used once, and a subscription; the
    server is then stopped (SIGSTOP: connections stay open, nothing answers)
    until the test ends."""
    store = RedisStore(server.namespaced_url())
    assert store.leases.acquire("L", "h", 60) is not None
    sub = store.pubsub.subscribe(["c"])
    store.kv.wait("p", store.kv.revision(), 0.05)  # connections made, scripts loaded
    store.leases.wait("L", 0.05)
    store.queue.wait_for_tasks(["q"], 0.05)
    store.queue.wait_for_finish(["x"], 0.05)
    store.streams.read("st", wait=0.05)
    assert sub.get(0.05) is None
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        yield store, sub
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
        sub.close()
        store.close()


@pytest.mark.timeout(60)
def test_every_wait_behind_a_stopped_server_raises_within_about_a_second(
    stopped: tuple[RedisStore, Any],
) -> None:
    store, sub = stopped
    waits: dict[str, Callable[[], object]] = {
        "kv.wait": lambda: store.kv.wait("p", 0, 0.2),
        "leases.wait": lambda: store.leases.wait("L", 0.2),
        "wait_for_tasks": lambda: store.queue.wait_for_tasks(["q"], 0.2),
        "wait_for_finish": lambda: store.queue.wait_for_finish(["x"], 0.2),
        "streams.read": lambda: store.streams.read("st", wait=0.2),
    }
    slow = {}
    for what, wait in waits.items():
        started = time.monotonic()
        with pytest.raises(BackendError):
            wait()
        slow[what] = time.monotonic() - started
    assert all(t < READ_TIMEOUT_S + 0.5 for t in slow.values()), slow
    started = time.monotonic()
    sub.get(0.2)  # a live but silent connection: nothing comes
    assert time.monotonic() - started < READ_TIMEOUT_S + 0.5


@pytest.mark.timeout(60)
def test_a_resubscription_to_a_stopped_server_fails_within_about_a_second(
    server: RedisServer,
) -> None:
    store = RedisStore(server.namespaced_url())
    sub = store.pubsub.subscribe(["c"])
    try:
        assert sub.get(0.05) is None
        admin = store.conn.client
        admin.client_kill_filter(_type="pubsub")
        while admin.client_list(_type="pubsub"):  # until the server dropped it
            time.sleep(0.01)
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(BackendError):  # reconnected, but no confirmation comes
                sub.get(0.2)
            assert time.monotonic() - started < READ_TIMEOUT_S + 0.5
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        assert sub.get(5.0) == Gap("reconnect")
    finally:
        sub.close()
        store.close()
