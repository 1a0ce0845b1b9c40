"""Private servers for tests: a redis-server on a free loopback port that a test
may stop, SIGKILL and restart without touching anyone else's server."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

REQUIRE_SERVICES = os.environ.get("TASKSPACE_REQUIRE_SERVICES") == "1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def missing(what: str) -> None:
    """Skip, or fail when the environment requires every service."""
    message = f"{what} is not available"
    if REQUIRE_SERVICES:
        pytest.fail(f"{message} and TASKSPACE_REQUIRE_SERVICES=1")
    pytest.skip(message)


class RedisServer:
    """A redis-server of our own on 127.0.0.1; AOF settings as asked."""

    def __init__(self, appendfsync: str | None = None, workdir: Path | None = None) -> None:
        self.port = free_port()
        self.dir = workdir or Path(tempfile.mkdtemp(prefix="taskspace-redis-"))
        self.appendfsync = appendfsync
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def namespaced_url(self) -> str:
        return f"{self.url}?namespace=t{uuid.uuid4().hex[:12]}"

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            missing("redis-server")
        args = [str(binary), "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.dir), "--save", "", "--daemonize", "no",
                "--logfile", str(self.dir / "redis.log")]  # fmt: skip
        if self.appendfsync:
            args += ["--appendonly", "yes", "--appendfsync", self.appendfsync]
        else:
            args += ["--appendonly", "no"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait_ready()
        return self

    def _wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.02)
        raise RuntimeError(f"redis-server on port {self.port} did not start")

    def stop(self) -> None:
        """Graceful shutdown (SIGTERM: Redis fsyncs its AOF and exits)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=15)

    def kill(self) -> None:
        """SIGKILL: no chance to flush anything."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=15)

    def restart(self) -> RedisServer:
        """Start again on the same port and directory after :meth:`stop` or :meth:`kill`.
        With AOF on, Redis replays its log before it answers PING, so once this
        returns the data is back."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"redis-server on port {self.port} is still running")
        return self.start()

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


_shared: RedisServer | None = None


def shared_redis() -> RedisServer:
    """One private redis-server for the whole test session (started on first use)."""
    global _shared
    if _shared is None:
        _shared = RedisServer().start()
    return _shared


def close_shared() -> None:
    global _shared
    if _shared is not None:
        _shared.close()
        _shared = None


# -- PostgreSQL ------------------------------------------------------------------------

PG_HOST = "127.0.0.1"
PG_PORT = 5432
PG_USER = "postgres"


def _pg_connect(dsn: str, timeout: float = 3.0):  # type: ignore[no-untyped-def]
    import psycopg

    return psycopg.connect(dsn, autocommit=True, connect_timeout=max(1, round(timeout)))


class SharedPostgres:
    """A fresh database ``taskspace_test_<hex>`` on the machine's PostgreSQL
    (127.0.0.1:5432, trust, user postgres) for one test session; every test
    gets its own schema in it (``url()``). Dropped at session end."""

    def __init__(self, host: str = PG_HOST, port: int = PG_PORT) -> None:
        self.host, self.port = host, port
        self.database = f"taskspace_test_{uuid.uuid4().hex[:10]}"
        admin = f"postgresql://{PG_USER}@{host}:{port}/postgres"
        try:
            with _pg_connect(admin) as conn:
                conn.execute(f'CREATE DATABASE "{self.database}"')
        except Exception as exc:  # no server, no psycopg: the caller skips or fails
            raise RuntimeError(f"PostgreSQL at {host}:{port}: {exc}") from exc
        self.admin = admin

    @property
    def base_url(self) -> str:
        return f"postgresql://{PG_USER}@{self.host}:{self.port}/{self.database}"

    def url(self) -> str:
        """A URL on a schema of its own (created by the first store that opens it).
        ``synchronous_commit=off``: no test here is about surviving a server
        crash (the fault tests run their own cluster), and a WAL flush per
        write would make the suite several times slower."""
        return f"{self.base_url}?schema=t{uuid.uuid4().hex[:12]}&synchronous_commit=off"

    def close(self) -> None:
        with contextlib.suppress(Exception), _pg_connect(self.admin) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')


_shared_pg: SharedPostgres | None = None


def shared_postgres() -> SharedPostgres:
    """The session's test database (created on first use); skips, or fails
    under TASKSPACE_REQUIRE_SERVICES=1, when PostgreSQL is not reachable."""
    global _shared_pg
    if _shared_pg is None:
        try:
            _shared_pg = SharedPostgres()
        except RuntimeError as exc:
            missing(str(exc))
    assert _shared_pg is not None
    return _shared_pg


def postgres_url() -> str:
    """A fresh schema URL in the session's test database (TASKSPACE_POSTGRES_URL
    overrides the server: a base URL without query)."""
    external = os.environ.get("TASKSPACE_POSTGRES_URL")
    if external:
        return f"{external}?schema=t{uuid.uuid4().hex[:12]}&synchronous_commit=off"
    return shared_postgres().url()


def close_shared_postgres() -> None:
    global _shared_pg
    if _shared_pg is not None:
        _shared_pg.close()
        _shared_pg = None


def pg_binaries() -> Path | None:
    """The directory of the newest PostgreSQL server binaries, or None."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: p.parts[-3])
    return found[-1].parent if found else None


class PgCluster:
    """A private PostgreSQL cluster (initdb/pg_ctl in a temp dir, on a free
    loopback port, trust auth) that a fault test may stop, SIGKILL and restart
    without touching anyone else's server. As root the server runs as the
    ``postgres`` user (initdb refuses root)."""

    def __init__(self) -> None:
        bindir = pg_binaries()
        if bindir is None:
            missing("PostgreSQL server binaries (/usr/lib/postgresql/*/bin)")
        assert bindir is not None
        self.bin = bindir
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="taskspace-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            self._as_user = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.dir, "postgres")
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust",
                  "-U", PG_USER, "--no-sync", "-E", "UTF8")  # fmt: skip

    def _run(self, *args: str) -> None:
        subprocess.run([*self._as_user, *args], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=60)  # fmt: skip

    @property
    def base_url(self) -> str:
        return f"postgresql://{PG_USER}@127.0.0.1:{self.port}/postgres"

    def url(self, **options: str) -> str:
        """A URL on a fresh schema of the cluster's ``postgres`` database."""
        query = "&".join(f"{k}={v}" for k, v in options.items())
        extra = f"&{query}" if query else ""
        return f"{self.base_url}?schema=t{uuid.uuid4().hex[:12]}{extra}"

    def start(self) -> PgCluster:
        opts = (f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir}"
                " -c fsync=off -c max_connections=200")  # fmt: skip
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log),
                  "-o", opts, "-w", "-t", "30", "start")  # fmt: skip
        return self

    def pid(self) -> int | None:
        """The postmaster's pid, or None when it is not running."""
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self, mode: str = "fast") -> None:
        """pg_ctl stop (``fast``: disconnect every client, clean shutdown)."""
        if self.pid() is not None:
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def kill(self) -> None:
        """SIGKILL the postmaster and every backend: a crash (recovery on restart)."""
        pid = self.pid()
        if pid is None:
            return
        children = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    children.append(int(stat.parent.name))
        for victim in (pid, *children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.02)
        with contextlib.suppress(FileNotFoundError):
            (self.data / "postmaster.pid").unlink()

    def restart(self) -> PgCluster:
        """Start again on the same port and data after stop() or kill()."""
        return self.start()

    def terminate_backends(self, application_name: str = "taskspace") -> int:
        """pg_terminate_backend every connection of ``application_name``;
        returns how many were terminated."""
        with _pg_connect(self.base_url) as conn:
            row = conn.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE application_name = %s AND pid <> pg_backend_pid()",
                (application_name,),
            ).fetchone()
        return int(row[0]) if row else 0

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.stop("immediate")
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
