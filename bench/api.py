"""``python -m bench api``: the HTTP API under concurrent status polling.

A ``taskspace serve`` process (one uvicorn process, as deployed) serves a
space (a new SQLite file, or a private ``redis-server``) holding ``--tasks``
tasks (half finished by a worker, half queued). ``--clients`` concurrent
clients (one keep-alive HTTP/1.1 connection each, a minimal asyncio client
so that the clients cost the host little CPU; spread over ``--procs``
processes) poll
``GET /api/tasks/{id}`` for random ids for ``--seconds``; every request is
timed. Reported: requests, requests/s, p50/p90/p99/max latency and errors
(any non-200 or transport error; must be 0, else exit code 1). With
``--token`` the server requires a bearer token and the clients send it.
"""

from __future__ import annotations

import asyncio
import os
import random
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import click
import httpx

from bench.redis_server import RedisServer, free_port

STARTUP_TIMEOUT_S = 30.0
SPAWN_S = 5.0  # client processes start (import httpx, connect) before the timed window


@dataclass
class Outcome:
    """What the clients saw."""

    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    server_cpu: float = 0.0
    first_errors: list[str] = field(default_factory=list)

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.first_errors) < 5:
            self.first_errors.append(what)


def _seed(url: str, tasks: int) -> list[str]:
    """Submit ``tasks`` tasks; a burst worker finishes the first half."""
    from taskspace import Space

    space = Space(url)

    @space.task(name="bench_api_noop", max_attempts=1)
    def noop(i: int) -> int:
        return i

    half = tasks // 2
    done = [h.id for h in noop.submit_many([(i,) for i in range(half)])]
    if done:
        space.run_worker(burst=True, concurrency=16, queues="default")
    queued = [h.id for h in noop.submit_many([(i,) for i in range(half, tasks)])]
    space.close()
    return done + queued


def _serve(url: str, port: int, token: str | None, logfile: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env.pop("TASKSPACE_API_TOKEN", None)
    if token:
        env["TASKSPACE_API_TOKEN"] = token
    out = logfile.open("wb")
    return subprocess.Popen([sys.executable, "-m", "taskspace", "serve", "--url", url,
                             "--port", str(port), "--log-level", "warning"],
                            env=env, stdout=out, stderr=subprocess.STDOUT)  # fmt: skip


def _wait_up(base: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise click.ClickException("taskspace serve exited during startup")
        try:
            if httpx.get(f"{base}/api/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise click.ClickException("taskspace serve did not come up")


async def _client(host: str, port: int, auth: str, ids: list[str], until: float,
                  out: Outcome) -> None:  # fmt: skip
    """One keep-alive HTTP/1.1 connection polling task status: a minimal client
    (raw asyncio streams), so the clients cost the host little CPU and the
    figures measure the server."""
    rng = random.Random()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.monotonic() < until:
            task_id = rng.choice(ids)
            request = (f"GET /api/tasks/{task_id} HTTP/1.1\r\nHost: {host}\r\n{auth}"
                       "Accept: application/json\r\n\r\n").encode()  # fmt: skip
            start = time.perf_counter()
            try:
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head.split(b" ", 2)[1])
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                data = await reader.readexactly(length)
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                out.error(repr(exc))
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
                continue
            elapsed = time.perf_counter() - start
            if status != 200 or task_id.encode() not in data:
                out.error(f"{status} {data[:200]!r}")
                continue
            out.latencies.append(elapsed)
    finally:
        writer.close()


def _load_proc(args: tuple[str, list[str], int, float, str | None, float]) -> Outcome:
    """One client process: ``clients`` connections from wall time ``start_at``
    (every process starts together) for ``seconds``."""
    base, ids, clients, seconds, token, start_at = args
    time.sleep(max(0.0, start_at - time.time()))
    return asyncio.run(_load(base, ids, clients, seconds, token))


async def _load(base: str, ids: list[str], clients: int, seconds: float,
                token: str | None) -> Outcome:  # fmt: skip
    out = Outcome()
    host, port = base.removeprefix("http://").rsplit(":", 1)
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    until = time.monotonic() + seconds
    await asyncio.gather(*(_client(host, int(port), auth, ids, until, out)
                           for _ in range(clients)))  # fmt: skip
    return out


def _run_clients(base: str, ids: list[str], clients: int, procs: int, seconds: float,
                 token: str | None, server_pid: int) -> Outcome:  # fmt: skip
    """``clients`` coroutines spread over ``procs`` processes (one client process
    alone cannot load a server: an HTTP client costs more CPU than the server)."""
    import multiprocessing

    shares = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
    start_at = time.time() + SPAWN_S
    jobs = [(base, ids, k, seconds, token, start_at) for k in shares if k]
    with multiprocessing.get_context("spawn").Pool(len(jobs)) as pool:
        pending = pool.map_async(_load_proc, jobs)
        time.sleep(max(0.0, start_at - time.time()))
        cpu_start = _cpu_seconds(server_pid)
        parts = pending.get()
        cpu = _cpu_seconds(server_pid) - cpu_start
    out = Outcome()
    for part in parts:
        out.latencies += part.latencies
        out.errors += part.errors
        out.first_errors = (out.first_errors + part.first_errors)[:5]
    out.server_cpu = cpu
    return out


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _quantile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


@click.command()
@click.option("--backend", type=click.Choice(("sqlite", "redis")), default="sqlite",
              show_default=True)  # fmt: skip
@click.option("--clients", default=50, show_default=True, type=click.IntRange(min=1))
@click.option("--seconds", default=30.0, show_default=True, type=click.FloatRange(min=0.5))
@click.option("--tasks", default=1000, show_default=True, type=click.IntRange(min=2),
              help="Tasks in the space (half finished, half queued).")  # fmt: skip
@click.option("--procs", default=2, show_default=True, type=click.IntRange(min=1),
              help="Client processes the clients are spread over.")  # fmt: skip
@click.option("--token", "use_token", is_flag=True, help="Require and send a bearer token.")
def cli(backend: str, clients: int, seconds: float, tasks: int, procs: int,
        use_token: bool) -> None:  # fmt: skip
    """HTTP API load: concurrent clients polling task status."""
    procs = min(procs, clients)
    workdir = Path(tempfile.mkdtemp(prefix="taskspace-bench-api-"))
    redis = RedisServer().start() if backend == "redis" else None
    url = redis.url if redis is not None else f"sqlite:///{workdir}/space.db"
    token = secrets.token_urlsafe(24) if use_token else None
    proc = None
    try:
        ids = _seed(url, tasks)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        proc = _serve(url, port, token, workdir / "serve.log")
        _wait_up(base, proc)
        load_before = os.getloadavg()[0]
        out = _run_clients(base, ids, clients, procs, seconds, token, proc.pid)
        load_after = os.getloadavg()[0]
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        if redis is not None:
            redis.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    lat = sorted(out.latencies)
    ms = [x * 1000 for x in (_quantile(lat, 0.5), _quantile(lat, 0.9), _quantile(lat, 0.99))]
    click.echo(f"backend {backend}, {clients} clients, {seconds:g} s, {tasks} tasks,"
               f" token {'on' if token else 'off'} (server: one uvicorn process)")  # fmt: skip
    click.echo(f"requests {len(lat):,}  ({len(lat) / seconds:,.0f}/s)  errors {out.errors}")
    click.echo(f"latency p50 {ms[0]:.1f} ms  p90 {ms[1]:.1f} ms  p99 {ms[2]:.1f} ms"
               f"  max {max(lat, default=0) * 1000:.1f} ms"
               f"  mean {statistics.fmean(lat) * 1000 if lat else 0:.1f} ms")  # fmt: skip
    n = max(1, len(lat) + out.errors)
    busy = out.server_cpu / seconds
    click.echo(f"server CPU {out.server_cpu / n * 1000:.2f} ms per request,"
               f" busy {busy:.0%} of one CPU; clients: {procs} processes")  # fmt: skip
    click.echo(f"host: {os.cpu_count()} CPUs, load average {load_before:.1f} before,"
               f" {load_after:.1f} after (the clients run on the same host)")  # fmt: skip
    for err in out.first_errors:
        click.echo(f"  error: {err}", err=True)
    if out.errors:
        sys.exit(1)
