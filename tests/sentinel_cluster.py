"""A private Redis Sentinel deployment for tests: a primary, one replica and three
sentinels (``redis-server <conf> --sentinel``), all on free loopback ports, no
persistence, each with its own temporary directory.

The primary sits behind :class:`Relay`, a TCP relay in this process that stands
for the network: every client, the replica and the sentinels reach the primary
through it (the sentinels monitor the relay's address, so the replica's view of
its primary agrees with theirs and no ``+fix-slave-config`` reroutes it). The
relay can **hold back the replication stream**: the primary keeps acknowledging
writes that the replica never receives, and when the primary is SIGKILLed the
held bytes are dropped, so the promoted replica really lacks those writes (what
an asynchronous-replication failover loses). Stopping the replica instead
(``DEBUG SLEEP``, SIGSTOP) would not: the writes wait in its socket buffer and
are applied when it wakes.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import redis

from tests.services import free_port, missing

SERVICE = "m"
DOWN_AFTER_MS = 500
FAILOVER_TIMEOUT_MS = 2000
HOST = "127.0.0.1"


def _poll(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``predicate`` (errors count as "not yet") until it returns something
    truthy; RuntimeError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except (redis.RedisError, OSError) as exc:
            last, value = exc, None
        if value:
            return value
        time.sleep(0.02)
    raise RuntimeError(f"timed out after {timeout} s waiting for {what} (last error: {last!r})")


def _is_sync(data: bytes) -> bool:
    """Whether a client's bytes hold a replica's PSYNC or SYNC command (RESP)."""
    return b"$5\r\nPSYNC\r\n" in data or b"$4\r\nSYNC\r\n" in data


def _sentinel_id(index: int) -> str:
    """A fixed 40-hex-digit run id for sentinel ``index``."""
    return f"{index + 1:040x}"


class Relay:
    """A TCP relay from a free loopback port to ``127.0.0.1:upstream``.

    A connection that sends ``PSYNC``/``SYNC`` is a replication link; while
    :meth:`hold` is in force, what the primary sends on it is not forwarded.
    :meth:`close` stops accepting, cuts every connection and drops whatever was
    held (counted in :attr:`dropped_bytes`)."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self._listener = socket.create_server((HOST, 0))
        self.port = int(self._listener.getsockname()[1])
        self._cond = threading.Condition()
        self._holding = False
        self._closed = False
        self._socks: list[socket.socket] = []
        self.dropped_bytes = 0
        self.replication_links = 0
        threading.Thread(target=self._accept, name="relay-accept", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                up = socket.create_connection((HOST, self.upstream), timeout=2.0)
                up.settimeout(None)
            except OSError:
                down.close()
                continue
            with self._cond:
                if self._closed:
                    down.close()
                    up.close()
                    return
                self._socks += [down, up]
            link = {"replication": False}
            for src, dst, downstream in ((down, up, False), (up, down, True)):
                threading.Thread(
                    target=self._pump, args=(src, dst, downstream, link), daemon=True
                ).start()

    def _pump(
        self, src: socket.socket, dst: socket.socket, downstream: bool, link: dict[str, bool]
    ) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if not downstream and not link["replication"] and _is_sync(data):
                    link["replication"] = True  # marked before the PSYNC is forwarded
                    with self._cond:
                        self.replication_links += 1
                if downstream and link["replication"] and not self._release(len(data)):
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _release(self, size: int) -> bool:
        """Wait while held; False (the bytes are dropped) once the relay closed."""
        with self._cond:
            while self._holding and not self._closed:
                self._cond.wait()
            if self._closed:
                self.dropped_bytes += size
                return False
            return True

    def hold(self) -> None:
        """Stop forwarding the replication stream to the replica (from now on)."""
        with self._cond:
            self._holding = True

    def resume(self) -> None:
        """Forward the replication stream again, held bytes first."""
        with self._cond:
            self._holding = False
            self._cond.notify_all()

    def close(self) -> None:
        """Stop accepting, cut every connection and drop what was held; idempotent."""
        with self._cond:
            self._closed = True
            socks, self._socks = self._socks, []
            self._cond.notify_all()
        with contextlib.suppress(OSError):
            self._listener.close()
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


class SentinelCluster:
    """A primary (behind a :class:`Relay`), a replica of it and three sentinels
    monitoring it as :data:`SERVICE` (quorum 2, down after DOWN_AFTER_MS,
    failover timeout FAILOVER_TIMEOUT_MS). ``password``: the primary and the
    replica require it (``requirepass``/``masterauth``, ``sentinel auth-pass``);
    ``sentinel_password``: the sentinels require it. Use as a context manager:
    every process is SIGKILLed and every file removed on the way out."""

    def __init__(
        self, sentinels: int = 3, password: str | None = None, sentinel_password: str | None = None
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            missing("redis-server")
        self.binary = str(binary)
        self.dir = Path(tempfile.mkdtemp(prefix="taskspace-sentinel-"))
        self.primary_port = free_port()
        self.replica_port = free_port()
        self.sentinel_ports = [free_port() for _ in range(sentinels)]
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.relay: Relay | None = None
        self._clients: dict[int, redis.Redis] = {}
        self.password = password
        self.sentinel_password = sentinel_password

    # -- processes ----------------------------------------------------------------

    def _spawn(self, name: str, args: list[str], port: int) -> None:
        log = str(self.dir / f"{name}.log")
        self.procs[name] = subprocess.Popen(
            [self.binary, *args, "--logfile", log],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        proc = self.procs[name]

        def answers() -> bool:
            if proc.poll() is not None:
                text = Path(log).read_text() if Path(log).exists() else ""
                raise RuntimeError(f"{name} exited with {proc.returncode}: {text[-2000:]}")
            return bool(self.redis(port).ping())

        _poll(answers, 15.0, f"{name} on port {port} to answer PING")

    def _server(self, name: str, port: int, *extra: str) -> None:
        workdir = self.dir / name
        workdir.mkdir()
        args = ["--port", str(port), "--bind", HOST, "--dir", str(workdir),
                "--save", "", "--appendonly", "no", "--daemonize", "no",
                # a replica's full sync starts at once (the default waits 5 s for more replicas)
                "--repl-diskless-sync-delay", "0", *extra]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password, "--masterauth", self.password]
        self._spawn(name, args, port)

    def _sentinel(self, index: int, port: int) -> None:
        """A sentinel whose configuration already names its peers and the
        replica (the state a sentinel writes back once it discovered them), so
        they agree at once instead of after a few hello periods of 2 s."""
        assert self.relay is not None
        monitor = f"{SERVICE} {HOST} {self.relay.port} 2"
        peers = "".join(
            f"sentinel known-sentinel {SERVICE} {HOST} {other} {_sentinel_id(j)}\n"
            for j, other in enumerate(self.sentinel_ports)
            if j != index
        )
        auth = f"sentinel auth-pass {SERVICE} {self.password}\n" if self.password else ""
        if self.sentinel_password:  # also what a sentinel presents to its peers
            auth += f"requirepass {self.sentinel_password}\n"
        conf = self.dir / f"sentinel-{index}.conf"
        conf.write_text(
            auth + f"port {port}\nbind {HOST}\ndaemonize no\ndir {self.dir}\n"
            f"sentinel myid {_sentinel_id(index)}\n"
            f"sentinel monitor {monitor}\n"
            f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}\n"
            f"sentinel known-replica {SERVICE} {HOST} {self.replica_port}\n{peers}"
        )
        self._spawn(f"sentinel-{index}", [str(conf), "--sentinel"], port)

    def start(self) -> SentinelCluster:
        """Start everything and wait until the replica is in sync and every
        sentinel knows the replica and the other sentinels (a failover needs
        them to agree)."""
        self._server("primary", self.primary_port)
        self.relay = Relay(self.primary_port)
        self._server("replica", self.replica_port, "--replicaof", HOST, str(self.relay.port))
        _poll(self._replica_in_sync, 15.0, "the replica to sync with the primary")
        for index, port in enumerate(self.sentinel_ports):
            self._sentinel(index, port)
        _poll(self._sentinels_agree, 20.0, "the sentinels to know each other and the replica")
        return self

    def _replica_in_sync(self) -> bool:
        return self.redis(self.replica_port).info("replication").get("master_link_status") == "up"

    def _sentinels_agree(self) -> bool:
        others = len(self.sentinel_ports) - 1
        for port in self.sentinel_ports:
            state: Any = self.redis(port).sentinel_master(SERVICE)
            if int(state["num-other-sentinels"]) < others or int(state["num-slaves"]) < 1:
                return False
        return True

    def redis(self, port: int) -> redis.Redis:
        """A plain client of one process of the cluster (closed with the cluster)."""
        client = self._clients.get(port)
        if client is None:
            sentinel = port in self.sentinel_ports
            client = redis.Redis(
                host=HOST,
                port=port,
                password=self.sentinel_password if sentinel else self.password,
                socket_timeout=2.0,
                socket_connect_timeout=1.0,
            )
            self._clients[port] = client
        return client

    # -- addresses ----------------------------------------------------------------

    def url(
        self,
        namespace: str | None = None,
        password: str | None = None,
        sentinel_password: str | None = None,
    ) -> str:
        """The ``redis+sentinel://`` URL of the service (with the cluster's
        passwords unless others are given)."""
        password = password or self.password
        sentinel_password = sentinel_password or self.sentinel_password
        hosts = ",".join(f"{HOST}:{port}" for port in self.sentinel_ports)
        auth = f":{password}@" if password else ""
        options = {"namespace": namespace, "sentinel_password": sentinel_password}
        query = urlencode({k: v for k, v in options.items() if v})
        return f"redis+sentinel://{auth}{hosts}/{SERVICE}/0" + (f"?{query}" if query else "")

    def master_addrs(self) -> list[tuple[str, int] | None]:
        """What each sentinel answers to ``SENTINEL get-master-addr-by-name``."""
        addrs: list[tuple[str, int] | None] = []
        for port in self.sentinel_ports:
            reply: Any = None
            with contextlib.suppress(redis.RedisError, OSError):
                reply = self.redis(port).sentinel_get_master_addr_by_name(SERVICE)
            if not reply:
                addrs.append(None)
                continue
            host = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
            addrs.append((host, int(reply[1])))
        return addrs

    def wait_replicated(self, timeout_ms: int = 5000) -> int:
        """``WAIT 1`` on the primary: how many replicas confirmed every write so far."""
        return int(self.redis(self.primary_port).execute_command("WAIT", 1, timeout_ms))  # type: ignore[no-untyped-call]

    def repl_offsets(self) -> tuple[int, int]:
        """(primary's replication offset, replica's processed offset): the
        difference is replication stream the replica has not applied."""
        primary = self.redis(self.primary_port).info("replication")
        replica = self.redis(self.replica_port).info("replication")
        return int(primary["master_repl_offset"]), int(replica["slave_repl_offset"])

    # -- faults -------------------------------------------------------------------

    def kill_primary(self) -> None:
        """SIGKILL the primary, then cut its network (the relay), dropping any
        replication stream held back."""
        proc = self.procs["primary"]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=15)
        assert self.relay is not None
        self.relay.close()

    def wait_promoted(self, timeout: float = 15.0) -> float:
        """Poll the sentinels until one names the replica as the primary; the
        seconds it took."""
        start = time.monotonic()
        replica = (HOST, self.replica_port)
        _poll(lambda: replica in self.master_addrs(), timeout, "a sentinel to promote the replica")
        _poll(
            lambda: self.redis(self.replica_port).info("replication")["role"] == "master",
            timeout,
            "the replica to take the primary role",
        )
        return time.monotonic() - start

    def close(self) -> None:
        """SIGKILL every process and remove the files; idempotent."""
        for client in self._clients.values():
            with contextlib.suppress(redis.RedisError, OSError):
                client.close()
        self._clients.clear()
        if self.relay is not None:
            self.relay.close()
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=15)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> SentinelCluster:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()
