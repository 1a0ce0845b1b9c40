"""The identity record of a Redis space (key ``P..'space'``): created with the
space, read when a store opens it, compared by ``check_space``."""

from __future__ import annotations

import uuid

from taskspace.backends.redis.conn import RedisConnection
from taskspace.errors import SpaceLost, SpaceNotFound


def open_space(conn: RedisConnection, create: bool) -> str:
    """The space id of ``conn``'s namespace. With ``create`` a space without
    one gets a fresh id (atomically: two clients opening an empty namespace at
    once agree on one id); without it an empty namespace raises SpaceNotFound
    (a namespace holding tasks from before spaces had ids gets one).
    BackendError if Redis fails."""
    space_id = conn.run("space", [int(create), uuid.uuid4().hex])
    if space_id is None:
        raise SpaceNotFound(
            f"no space at {conn.url} (namespace {conn.namespace!r}): nothing was created"
        )
    return str(space_id.decode())


def check_space(conn: RedisConnection, space_id: str) -> None:
    """SpaceLost if the space's identity record is gone or is not ``space_id``;
    BackendError if it cannot be read."""
    key = conn.prefix + "space"
    current = conn.call(lambda: conn.reads.get(key))
    if current is None or current.decode() != space_id:
        now = "gone" if current is None else f"now {current.decode()}"
        raise SpaceLost(
            f"the space at {conn.url} (namespace {conn.namespace!r}) was wiped or replaced"
            f" since this client opened it (space {space_id}, {now}); what it held is lost"
        )
