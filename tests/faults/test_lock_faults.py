"""Locks under a nemesis: real processes, real SIGSTOP and SIGKILL.

Child processes loop: acquire ``lock/res`` (TTL 0.5 s), write the resource
(``space.kv.put("resource", ..., fence=lease)``), work, write again, release.
The nemesis, in the test process, picks the current holder (from
``leases.holders``) and either SIGSTOPs it for 1.5-3x the TTL or SIGKILLs it
(and starts a replacement).

Checked: every pause ends with another process holding the lock with a
larger token while the first is stopped; a resumed holder reads
``held == False`` and its fenced write is refused (also the raw store txn
with ``GrantHeld``, whatever the holder believes); the accepted writes,
ordered by their KV version, never go back in token (stale writes accepted:
0); after a SIGKILL the next holder follows within TTL + 0.5 s. The canary
runs the same nemesis with unfenced writes and must see stale writes, which
proves the pauses land inside critical sections.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from taskspace import BackendError, LeaseLost, Space
from taskspace.backends.base import Grant, GrantHeld, Put
from taskspace.coordination.lease import Lease
from tests.faults.harness import FIGURES, REPO_ROOT, process_state, wait_for, writes_blocked

pytestmark = pytest.mark.fault

TTL_S = 0.5
WORK_S = 0.15
RUN_S = 7.0
CHILDREN = 4
KILLS = 2


# -- the child -----------------------------------------------------------------------


def _log(fd: int, *fields: object) -> None:
    os.write(fd, (" ".join(str(f) for f in fields) + "\n").encode())


def _write(space: Space, lease: object, mode: str, events: int) -> bool:
    """One write of the critical section; False once the holder must stop."""
    from taskspace.coordination.lease import Lease

    assert isinstance(lease, Lease)
    pid = os.getpid()
    value = {"token": lease.token, "pid": pid}
    if mode == "unfenced":
        version = space.kv.put("resource", value)
        _log(events, "write", lease.token, pid, version, time.time())
        return True
    if not lease.held:
        _log(events, "lost_seen", lease.token, pid, 0, time.time())
        # whatever the holder believes, the store itself refuses the stale grant
        raw = space.store.kv.txn([GrantHeld(lease.grant)], [Put("resource", b"{}")])
        _log(events, "stale_accepted" if raw.ok else "store_refused", lease.token, pid, 0, 0)
        return False
    try:
        version = space.kv.put("resource", value, fence=lease)
    except LeaseLost:
        _log(events, "refused", lease.token, pid, 0, time.time())
        return False
    _log(events, "write", lease.token, pid, version, time.time())
    return True


def _child(url: str, workdir: str, mode: str) -> None:
    space = Space(url)
    work = Path(workdir)
    lock = space.lock("res", ttl=TTL_S)
    events = os.open(work / "events.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    (work / f"ready.{os.getpid()}").touch()
    while not (work / "stop").exists():
        try:
            lease = lock.acquire(wait=1.0)
            if lease is None:
                continue
            _log(events, "acquired", lease.token, os.getpid(), 0, time.time())
            for i in range(2):  # write, work, write: a pause mostly lands before a write
                if i:
                    time.sleep(WORK_S)
                if not _write(space, lease, mode, events):
                    break
            if not lease.release():
                _log(events, "stale_release", lease.token, os.getpid(), 0, time.time())
        except BackendError as exc:  # a stopped SQLite writer can stall the others briefly
            _log(events, "backend_error", 0, os.getpid(), 0, repr(str(exc)).replace(" ", "_"))
            time.sleep(0.05)


# -- the nemesis ---------------------------------------------------------------------


@dataclass
class Run:
    url: str
    work: Path
    mode: str
    children: list[subprocess.Popen[bytes]] = field(default_factory=list)
    pauses: list[tuple[int, int, float, float]] = field(default_factory=list)  # pid, token, t0, t1
    kills: list[tuple[int, int, float]] = field(default_factory=list)  # pid, token, time

    def spawn(self) -> None:
        out = open(self.work / f"child.{len(self.children)}.log", "wb")  # noqa: SIM115
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        self.children.append(
            subprocess.Popen(
                [sys.executable, "-m", "tests.faults.test_lock_faults", self.url, str(self.work),
                 self.mode],
                cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
            )
        )  # fmt: skip
        out.close()

    returns: list[float] = field(default_factory=list)  # kill -> its grant gone from holders
    lease_name: str = "lock/res"

    def holder(self, space: Space, rng: random.Random | None = None) -> tuple[int, Grant] | None:
        """A live holder not killed yet (the oldest, or a random one with ``rng``)."""
        killed = {k[0] for k in self.kills}
        holders = [(int(g.holder.rsplit(":", 1)[1]), g)
                   for g in space.store.leases.holders(self.lease_name)]  # fmt: skip
        if rng is None:
            return holders[0] if holders else None
        alive = [h for h in holders if h[0] not in killed]
        return rng.choice(alive) if alive else None

    def nemesis(self, space: Space, rng: random.Random, kills: int, pick_any: bool = False) -> None:
        end = time.monotonic() + RUN_S
        strikes = 0
        while time.monotonic() < end:
            time.sleep(rng.uniform(0.2, 0.4))
            found = self.holder(space, rng if pick_any else None)
            if found is None:
                continue
            pid, grant = found
            token = grant.token
            if pid in {k[0] for k in self.kills}:
                continue  # killed: its grant lives on until its TTL runs out
            strikes += 1
            if len(self.kills) < kills and strikes % 2 == 0:  # pause, kill, pause, kill, pause...
                os.kill(pid, signal.SIGKILL)
                self.kills.append((pid, token, time.time()))
                self.returns.append(self.permit_back(space, grant))
                self.spawn()
                continue
            with writes_blocked(self.url):
                os.kill(pid, signal.SIGSTOP)
                wait_for(lambda p=pid: process_state(p) == "T", 5.0, f"pid {pid} to stop")
            start = time.time()
            time.sleep(rng.uniform(1.5, 3.0) * TTL_S)
            os.kill(pid, signal.SIGCONT)
            self.pauses.append((pid, token, start, time.time()))

    def permit_back(self, space: Space, grant: Grant) -> float:
        """Seconds from now (the SIGKILL) until ``grant`` is no longer a live holder."""
        killed = time.monotonic()
        while any(g.id == grant.id for g in space.store.leases.holders(self.lease_name)):
            if time.monotonic() - killed > 10 * TTL_S:
                break
            time.sleep(0.01)
        return time.monotonic() - killed

    def stop(self) -> None:
        (self.work / "stop").touch()
        for child in self.children:
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()

    def events(self) -> list[tuple[str, int, int, int, float]]:
        rows = []
        for line in (self.work / "events.log").read_text().splitlines():
            kind, token, pid, version, at = line.split()
            rows.append((kind, int(token), int(pid), int(version), _float(at)))
        return rows


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return 0.0


def run_nemesis(url: str, work: Path, mode: str, kills: int) -> Run:
    work.mkdir()
    semaphore = mode.startswith("sem-")
    run = Run(url, work, mode, lease_name="sem/pool" if semaphore else "lock/res")
    space = Space(url)
    try:
        space.store.leases.holders(run.lease_name)  # create the space before the children
        for _ in range(CHILDREN):
            run.spawn()
        wait_for(lambda: len(list(work.glob("ready.*"))) >= CHILDREN, 15.0, "children ready")
        run.nemesis(space, random.Random(os.getpid()), kills, pick_any=semaphore)
    finally:
        run.stop()
        space.close()
    return run


def stale_writes(events: list[tuple[str, int, int, int, float]]) -> int:
    """Accepted writes, in KV version order, whose token is below one written before."""
    writes = sorted((v, token) for kind, token, _, v, _ in events if kind == "write")
    stale, top = 0, 0
    for _, token in writes:
        if token < top:
            stale += 1
        top = max(top, token)
    return stale


def takeovers(run: Run, events: list[tuple[str, int, int, int, float]]) -> int:
    """Pauses during which another process acquired with a larger token."""
    acquired = [(t, token, pid) for kind, token, pid, _, t in events if kind == "acquired"]
    return sum(
        any(pid != p and token > tok and t0 <= t <= t1 for t, token, pid in acquired)
        for p, tok, t0, t1 in run.pauses
    )


def handovers_after_kills(run: Run, events: list[tuple[str, int, int, int, float]]) -> list[float]:
    acquired = sorted((t, token) for kind, token, _, _, t in events if kind == "acquired")
    out = []
    for _, token, at in run.kills:
        after = [t for t, tok in acquired if tok > token and t >= at]
        out.append(after[0] - at if after else float("inf"))
    return out


def test_sigstopped_holder_is_fenced(fault_url: str, tmp_path: Path) -> None:
    run = run_nemesis(fault_url, tmp_path / "fenced", "fenced", KILLS)
    events = run.events()
    count = {k: sum(1 for e in events if e[0] == k) for k in {e[0] for e in events}}
    stale = stale_writes(events) + count.get("stale_accepted", 0)
    taken = takeovers(run, events)
    handovers = handovers_after_kills(run, events)
    backend = fault_url.split(":")[0]
    figure = (
        f"lock nemesis [{backend}] ttl={TTL_S}s {RUN_S:.0f}s x {CHILDREN} processes:"
        f" ops tried={count.get('acquired', 0)} acquisitions + {count.get('write', 0)} fenced"
        f" writes; faults injected={len(run.pauses)} SIGSTOPs (1.5-3x ttl) +"
        f" {len(run.kills)} SIGKILLs; taken over during a pause={taken}/{len(run.pauses)};"
        f" resumed holders that read held=False={count.get('lost_seen', 0)}"
        f" (store refused their raw fenced write: {count.get('store_refused', 0)}),"
        f" fenced writes refused={count.get('refused', 0)},"
        f" stale releases={count.get('stale_release', 0)};"
        f" kill->next holder max={max(handovers, default=0):.2f}s;"
        f" violations (stale writes accepted)={stale}"
    )
    print(figure)
    FIGURES.append(figure)
    assert run.pauses, "the nemesis paused nobody"
    assert stale == 0
    assert taken == len(run.pauses), "another process took the lock during every pause"
    assert count.get("lost_seen", 0) >= 1, "a resumed holder saw held False"
    assert count.get("store_refused", 0) == count.get("lost_seen", 0)
    assert all(h <= TTL_S + 0.5 for h in handovers), handovers


def test_canary_unfenced_writes_go_stale(fault_url: str, tmp_path: Path) -> None:
    """The same nemesis with writes that ignore the lease: stale writes land,
    so the fenced run's zero is not for want of faults."""
    run = run_nemesis(fault_url, tmp_path / "canary", "unfenced", kills=0)
    stale = stale_writes(run.events())
    figure = (
        f"lock canary [{fault_url.split(':')[0]}] unfenced writes under"
        f" {len(run.pauses)} SIGSTOPs: stale writes accepted={stale} (must be > 0)"
    )
    print(figure)
    FIGURES.append(figure)
    assert stale > 0


def test_killed_semaphore_holders_return_their_permits(fault_url: str, tmp_path: Path) -> None:
    """Two holders of a limit-2 semaphore are SIGKILLed: both permits come
    back within TTL + 0.5 s."""
    space = Space(fault_url)
    sem = space.semaphore("gpu", limit=2, ttl=TTL_S)
    code = (
        "import sys, time; from taskspace import Space;"
        f"s = Space(sys.argv[1]); l = s.semaphore('gpu', limit=2, ttl={TTL_S!r}).acquire(wait=10);"
        "print(l.token, flush=True); time.sleep(60)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    children = [
        subprocess.Popen(
            [sys.executable, "-c", code, fault_url], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE
        )
        for _ in range(2)
    ]
    try:
        for child in children:
            assert child.stdout is not None and child.stdout.readline().strip()
        assert sem.acquire(wait=0) is None
        for child in children:
            child.kill()
        killed = time.monotonic()
        leases = [sem.acquire(wait=5), sem.acquire(wait=5)]
        took = time.monotonic() - killed
    finally:
        for child in children:
            child.kill()
            child.wait()
            if child.stdout is not None:
                child.stdout.close()
    figure = (
        f"semaphore [{fault_url.split(':')[0]}] 2 holders SIGKILLed: permits back in {took:.2f}s"
    )
    print(figure)
    FIGURES.append(figure)
    assert all(lease is not None for lease in leases)
    assert took <= TTL_S + 0.5
    for lease in leases:
        assert lease is not None and lease.release()
    space.close()


# -- fault test 2: a semaphore of limit K under the same nemesis ------------------------

SEM_K = 2


def _act(space: Space, lease: Lease, mode: str, events: int) -> None:
    """One act on the resource: a write at its start and one at its end,
    WORK_S apart. Fenced: each write is a fenced put, with a held-check
    right before it; unfenced (the canary): plain puts, no check."""
    pid = os.getpid()
    for edge in ("begin", "end"):
        if edge == "end":
            time.sleep(WORK_S)
        value = {"token": lease.token, "pid": pid, "edge": edge}
        if mode == "unfenced":
            version = space.kv.put("resource", value)
        elif not lease.held:
            _log(events, "lost_seen", lease.token, pid, 0, time.time())
            return
        else:
            try:
                version = space.kv.put("resource", value, fence=lease)
            except LeaseLost:
                _log(events, "refused", lease.token, pid, 0, time.time())
                return
        _log(events, edge, lease.token, pid, version, time.time())


def _sem_child(url: str, workdir: str, mode: str) -> None:
    space = Space(url)
    work = Path(workdir)
    sem = space.semaphore("pool", SEM_K, ttl=TTL_S)
    events = os.open(work / "events.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    (work / f"ready.{os.getpid()}").touch()
    while not (work / "stop").exists():
        try:
            lease = sem.acquire(wait=1.0)
            if lease is None:
                continue
            _log(events, "acquired", lease.token, os.getpid(), 0, time.time())
            _act(space, lease, mode, events)
            if not lease.release():
                _log(events, "stale_release", lease.token, os.getpid(), 0, time.time())
        except BackendError as exc:  # a stopped SQLite writer can stall the others briefly
            _log(events, "backend_error", 0, os.getpid(), 0, repr(str(exc)).replace(" ", "_"))
            time.sleep(0.05)


def acting_overlaps(events: list[tuple[str, int, int, int, float]]) -> tuple[int, int]:
    """(max concurrent acting holders, writes at which more than SEM_K acted).

    Every write goes to one key, so KV versions order all of them. An act
    spans its begin write to its end write (to its begin write alone if the
    end was refused). A fenced write lands only while its grant is live, and
    a grant is live over one interval, so at any write at most SEM_K fenced
    acts can be open."""
    begins = {token: v for kind, token, _, v, _ in events if kind == "begin"}
    ends = {token: v for kind, token, _, v, _ in events if kind == "end"}
    spans = [(v, ends.get(token, v)) for token, v in begins.items()]
    points = sorted({v for kind, _, _, v, _ in events if kind in ("begin", "end")})
    counts = [sum(1 for b, e in spans if b <= v <= e) for v in points]
    return max(counts, default=0), sum(1 for c in counts if c > SEM_K)


def test_semaphore_never_more_than_k_acting_holders(fault_url: str, tmp_path: Path) -> None:
    """Issue 8 fault test 2: SEM_K permits, CHILDREN processes, holders
    SIGSTOPped for 1.5-3x the TTL or SIGKILLed: never more than SEM_K acting
    at once (fenced writes in version order), and a killed holder's permit
    is back (its grant gone from the holders) within TTL + 0.5 s."""
    run = run_nemesis(fault_url, tmp_path / "sem", "sem-fenced", KILLS)
    events = run.events()
    count = {k: sum(1 for e in events if e[0] == k) for k in {e[0] for e in events}}
    most, violations = acting_overlaps(events)
    backend = fault_url.split(":")[0]
    figure = (
        f"semaphore nemesis [{backend}] limit={SEM_K} ttl={TTL_S}s {RUN_S:.0f}s x {CHILDREN}"
        f" processes: acquisitions={count.get('acquired', 0)}, acts={count.get('begin', 0)};"
        f" faults injected={len(run.pauses)} SIGSTOPs (1.5-3x ttl) + {len(run.kills)} SIGKILLs;"
        f" resumed holders that read held=False={count.get('lost_seen', 0)},"
        f" fenced writes refused={count.get('refused', 0)};"
        f" max concurrent acting holders={most} (limit {SEM_K});"
        f" killed permits back in max={max(run.returns, default=0):.2f}s;"
        f" violations={violations}"
    )
    print(figure)
    FIGURES.append(figure)
    assert run.pauses and run.kills, "the nemesis struck nobody"
    assert count.get("acquired", 0) >= 10
    assert violations == 0 and most <= SEM_K
    assert most == SEM_K, "the holders never acted together: the test would prove nothing"
    assert all(t <= TTL_S + 0.5 for t in run.returns), run.returns


def test_semaphore_canary_unfenced_acts_overlap(fault_url: str, tmp_path: Path) -> None:
    """The same nemesis with acts that neither check nor fence: more than
    SEM_K acts overlap, so the fenced run's bound is not for want of faults."""
    run = run_nemesis(fault_url, tmp_path / "sem-canary", "sem-unfenced", kills=0)
    most, violations = acting_overlaps(run.events())
    figure = (
        f"semaphore canary [{fault_url.split(':')[0]}] unfenced acts under {len(run.pauses)}"
        f" SIGSTOPs: max concurrent={most} (limit {SEM_K}), writes with more={violations}"
        " (must be > 0)"
    )
    print(figure)
    FIGURES.append(figure)
    assert violations > 0


if __name__ == "__main__":
    if sys.argv[3].startswith("sem-"):
        _sem_child(sys.argv[1], sys.argv[2], sys.argv[3][4:])
    else:
        _child(sys.argv[1], sys.argv[2], sys.argv[3])
