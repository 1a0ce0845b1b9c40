"""Agents that collaborate: a shared blackboard, a message stream and a memoized model.

The parent publishes DOCS documents to the stream "docs". AGENTS processes
(each with its own Space on one SQLite file; a redis:// or postgresql:// URL
works the same across machines) consume them as one consumer group,
"agents", so each document goes to exactly one agent. For each document an
agent calls ``model(topic)``: a deterministic function with a delay,
memoized across every process with ``@space.cached`` (single-flight: the
documents share TOPICS topics, so most calls are answered from the cache
even while another agent is still computing the same topic). It then adds to
the topic's tally on the blackboard with ``space.kv.update`` (read-modify-write
from several processes at once, never losing an increment), publishes a note
to the stream "results" and acks the document.

The parent watches the blackboard (``space.kv.watch``) and prints the
tallies as they change (every fifth step), then replays "results" and prints who handled what,
the model's computations against its calls (the cache hit rate) and the
tallies. It exits 1 unless every document was handled exactly once, the
tallies add up and the model computed each topic once.
Run: python examples/agents.py
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
import time
from collections import Counter

from taskspace import Space

AGENTS = 3
DOCS = 60
TOPICS = ("agents", "caching", "consensus", "embeddings", "queues", "streams")
MODEL_S = 0.2  # one "model call"


def agent(url: str, index: int) -> None:
    """Handle documents from the group "agents" until a "stop" message."""
    space = Space(url)
    who = f"agent-{index}"

    @space.cached(ttl=600, name="example.model")
    def model(topic: str) -> str:
        time.sleep(MODEL_S)  # the expensive call, made once per topic across all agents
        space.kv.incr("stats/computed")
        return f"{topic}: {sum(map(ord, topic)) % 97} facts (by {who}, pid {os.getpid()})"

    results = space.stream("results")
    consumer = space.stream("docs").group("agents", start="earliest").consumer(who)
    try:
        for message in consumer:
            doc = message.data
            if doc == "stop":
                message.ack()
                break
            summary = model(doc["topic"])
            space.kv.incr("stats/calls")
            space.kv.update(f"board/{doc['topic']}", lambda n: n + 1, default=0)
            results.publish({"doc": doc["id"], "agent": who, "summary": summary})
            message.ack()
    finally:
        consumer.close()
        space.close()


def main() -> int:
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="taskspace-agents-") as tmp:
        url = f"sqlite:///{tmp}/space.db"
        space = Space(url)
        board = space.kv.watch("board/")  # from now on: every change, once, in order
        docs = space.stream("docs")
        docs.publish_many([{"id": i, "topic": TOPICS[i % len(TOPICS)]} for i in range(DOCS)])
        started = time.monotonic()
        procs = [ctx.Process(target=agent, args=(url, i + 1)) for i in range(AGENTS)]
        for p in procs:
            p.start()

        tallies: dict[str, int] = {}
        while sum(tallies.values()) < DOCS and time.monotonic() - started < 120:
            change = board.get(timeout=1.0)
            if change is not None and change.kind == "put":
                tallies[change.key.removeprefix("board/")] = change.value
                if change.value % 5 == 0:  # every fifth, to keep the output short
                    print(f"  blackboard: {change.key} = {change.value}"
                          f" (revision {change.revision})")  # fmt: skip
        board.close()
        docs.publish_many(["stop"] * AGENTS)  # one each: an agent stops after its first
        for p in procs:
            p.join(30)

        notes = [m.data for m in space.stream("results").read(limit=DOCS + 10)]
        calls, computed = space.kv.get("stats/calls", 0), space.kv.get("stats/computed", 0)
        space.close()

    handled = Counter(note["doc"] for note in notes)
    per_agent = Counter(note["agent"] for note in notes)
    shares = ", ".join(f"{a} {n}" for a, n in sorted(per_agent.items()))
    print(f"{len(notes)} documents handled in {time.monotonic() - started:.1f} s by"
          f" {AGENTS} agents: {shares}")  # fmt: skip
    hit_rate = 1 - computed / calls if calls else 0.0
    print(f"model: {computed} computations for {calls} calls: cache hit rate {hit_rate:.0%}"
          f" (single-flight: one computation per topic across every process)")  # fmt: skip
    print("tallies:", ", ".join(f"{t} {n}" for t, n in sorted(tallies.items())))
    ok = (
        sorted(handled) == list(range(DOCS))
        and set(handled.values()) == {1}
        and sum(tallies.values()) == DOCS
        and computed == len(TOPICS)
        and all(p.exitcode == 0 for p in procs)
    )
    print("OK" if ok else "VIOLATION")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
