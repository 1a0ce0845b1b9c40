"""``space.logs.follow`` (and so ``taskspace logs --follow``) rides out a backend
outage: it resumes after the last record it yielded, missing and repeating none."""

from __future__ import annotations

import logging
import threading
import time

from taskspace import Space
from taskspace.logs import Handler
from tests.services import RedisServer


def test_follow_resumes_after_a_redis_restart_missing_and_repeating_nothing() -> None:
    server = RedisServer(appendfsync="always").start()
    space = Space(server.namespaced_url())
    logger = logging.getLogger("tests.follow_outage")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    handler = Handler(space)
    logger.addHandler(handler)
    seen: list[str] = []
    done = threading.Event()

    def follow() -> None:
        for record in space.logs.follow(after=0, timeout=20):
            seen.append(record.message)
            if record.message == "line 9":
                done.set()
                return

    try:
        for i in range(5):
            logger.info("line %d", i)
        handler.flush()
        reader = threading.Thread(target=follow, daemon=True)
        reader.start()
        deadline = time.monotonic() + 10
        while len(seen) < 5 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert seen == [f"line {i}" for i in range(5)]
        server.kill()  # the follower's connection breaks mid-wait
        time.sleep(0.3)  # it retries meanwhile (a BackendError each time)
        server.restart()
        for i in range(5, 10):
            logger.info("line %d", i)
        handler.flush()
        assert done.wait(20), seen
        assert seen == [f"line {i}" for i in range(10)]
    finally:
        logger.removeHandler(handler)
        handler.close()
        space.close()
        server.close()
