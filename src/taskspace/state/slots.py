"""Hash slots for sharding (Redis Cluster's scheme) and the slot → shard map.

A key belongs to one of ``NUM_SLOTS`` (16,384) fixed slots: the CRC16 of the
key (XMODEM, as Redis Cluster), or of its hash tag, modulo 16,384. The hash
tag is Redis Cluster's rule: if the key has a ``{``, and a ``}`` after it with
at least one character between, only what is between the first ``{`` and the
first ``}`` after it is hashed, so ``{user1}.following`` and
``{user1}.followers`` share a slot (and a shard)::

    key_slot("somekey")            # 11058
    key_slot("{user1}.following")  # 8106

:class:`SlotMap` is the versioned assignment of every slot to a shard that
:class:`~taskspace.state.sharding.ShardedKV` keeps in its coordinating space;
:func:`plan_moves` is the pure planner of a rebalance: every shard gets an
even share (16,384 // N slots, the lowest shard ids one more), and only slots
of shards above their share (or leaving) move, to shards below it, so on a
join no slot moves between shards that stay.
"""

from __future__ import annotations

import binascii
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from taskspace.errors import ConfigError

NUM_SLOTS = 16_384

SHARD_ACTIVE = "active"
SHARD_LEAVING = "leaving"
MAP_FORMAT = 1


def _crc16_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
        table.append(crc & 0xFFFF)
    return tuple(table)


CRC16_TABLE = _crc16_table()


def crc16_table(data: bytes) -> int:
    """CRC16-CCITT (XMODEM: poly 0x1021, init 0) of ``data`` with a 256-entry
    table in pure Python; the reference :func:`crc16` is checked against."""
    crc = 0
    table = CRC16_TABLE
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ table[(crc >> 8) ^ byte]
    return crc


def crc16(data: bytes) -> int:
    """CRC16-CCITT (XMODEM) of ``data``: ``crc16(b"123456789") == 0x31C3``.
    ``binascii.crc_hqx`` is this exact CRC, table-driven in C (about 20x the
    pure-Python table loop)."""
    return binascii.crc_hqx(data, 0)


def hash_tag(key: str) -> str:
    """The part of ``key`` that is hashed: what is between the first ``{`` and
    the first ``}`` after it if that is non-empty, else the whole key."""
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            return key[start + 1 : end]
    return key


def key_slot(key: str) -> int:
    """The slot (0..16,383) of ``key``: CRC16 of its hash tag (or of the whole
    key) modulo 16,384, on the UTF-8 bytes. A key that is not a non-empty
    string raises ConfigError."""
    if not isinstance(key, str) or not key:
        raise ConfigError(f"key={key!r}: must be a non-empty string")
    start = key.find("{")  # hash_tag, inlined: this runs on every call
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    return binascii.crc_hqx(key.encode("utf-8", "surrogatepass"), 0) & (NUM_SLOTS - 1)


def even_split(shard_ids: Sequence[int]) -> list[int]:
    """How many slots each of ``shard_ids`` gets: NUM_SLOTS // n each, and one
    more for the first NUM_SLOTS % n (the lowest ids when sorted)."""
    base, extra = divmod(NUM_SLOTS, len(shard_ids))
    return [base + (1 if i < extra else 0) for i in range(len(shard_ids))]


def ranges_of(owners: Sequence[int]) -> list[list[int]]:
    """``owners`` (one shard id per slot) as ``[start, end, id]`` runs (end exclusive)."""
    runs: list[list[int]] = []
    for slot, owner in enumerate(owners):
        if runs and runs[-1][2] == owner and runs[-1][1] == slot:
            runs[-1][1] = slot + 1
        else:
            runs.append([slot, slot + 1, owner])
    return runs


@dataclass(frozen=True, slots=True)
class SlotMap:
    """One version of the slot → shard map (immutable; a new map is a new object).

    ``version`` is the coordinator's KV version of the map key (it increases
    with every change); ``shards`` maps shard id → URL (ids are never reused);
    ``status`` maps shard id → ``active`` | ``leaving``; ``owners[slot]`` is
    the shard id owning the slot; ``ready`` is False until every shard holds
    its slots' ownership markers; ``moving`` is the batch a rebalance is
    moving (``{"from": id, "to": id, "slots": [...]}``) and ``cleanup`` the
    batch whose copies on the old shard are still to be deleted, so a
    rebalance killed mid-batch is resumed exactly there.
    """

    version: int
    shards: dict[int, str]
    status: dict[int, str]
    owners: tuple[int, ...]
    next_id: int
    ready: bool = False
    moving: dict[str, Any] | None = None
    cleanup: dict[str, Any] | None = None
    counts: dict[int, int] = field(default_factory=dict)

    @classmethod
    def initial(cls, urls: Sequence[str]) -> SlotMap:
        """Shards 0..n-1 for ``urls``, each with one contiguous run of an even share."""
        owners: list[int] = []
        for shard_id, count in enumerate(even_split(range(len(urls)))):
            owners += [shard_id] * count
        return cls.build(
            0,
            dict(enumerate(urls)),
            dict.fromkeys(range(len(urls)), SHARD_ACTIVE),
            owners,
            len(urls),
        )

    @classmethod
    def build(
        cls,
        version: int,
        shards: dict[int, str],
        status: dict[int, str],
        owners: Sequence[int],
        next_id: int,
        ready: bool = False,
        moving: dict[str, Any] | None = None,
        cleanup: dict[str, Any] | None = None,
    ) -> SlotMap:
        counts = dict.fromkeys(shards, 0)
        for owner in owners:
            counts[owner] += 1
        return cls(version, dict(shards), dict(status), tuple(owners), next_id, ready, moving,
                   cleanup, counts)  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        """The stored form (runs of slots, not 16,384 entries)."""
        return {
            "format": MAP_FORMAT,
            "shards": [[i, self.shards[i], self.status[i]] for i in sorted(self.shards)],
            "next_id": self.next_id,
            "slots": ranges_of(self.owners),
            "ready": self.ready,
            "moving": self.moving,
            "cleanup": self.cleanup,
        }

    @classmethod
    def from_json(cls, version: int, data: Any) -> SlotMap:
        """Parse a stored map; ConfigError if it is not one (a foreign key)."""
        try:
            if data["format"] != MAP_FORMAT:
                raise ValueError(f"format {data['format']!r}")
            shards = {int(i): str(url) for i, url, _ in data["shards"]}
            status = {int(i): str(st) for i, _, st in data["shards"]}
            owners = [0] * NUM_SLOTS
            covered = 0
            for start, end, owner in data["slots"]:
                if owner not in shards:
                    raise ValueError(f"slots {start}..{end} owned by unknown shard {owner}")
                owners[start:end] = [owner] * (end - start)
                covered += end - start
            if covered != NUM_SLOTS:
                raise ValueError(f"covers {covered} slots, not {NUM_SLOTS}")
            return cls.build(version, shards, status, owners, int(data["next_id"]),
                             bool(data["ready"]), data.get("moving"),
                             data.get("cleanup"))  # fmt: skip
        except (KeyError, TypeError, ValueError) as exc:
            problem = f"the stored slot map (version {version}) is malformed: {exc}"
            raise ConfigError(problem) from None

    def replace(self, **changes: Any) -> SlotMap:
        """A copy with ``changes`` (``owners`` recounted)."""
        values: dict[str, Any] = {
            "version": self.version,
            "shards": self.shards,
            "status": self.status,
            "owners": self.owners,
            "next_id": self.next_id,
            "ready": self.ready,
            "moving": self.moving,
            "cleanup": self.cleanup,
        }
        values.update(changes)
        return SlotMap.build(**values)

    def shard_of(self, url: str) -> int | None:
        """The id of the shard at ``url``, or None."""
        for shard_id, shard_url in self.shards.items():
            if shard_url == url:
                return shard_id
        return None

    def slots_of(self, shard_id: int) -> list[int]:
        """The slots ``shard_id`` owns, ascending."""
        return [slot for slot, owner in enumerate(self.owners) if owner == shard_id]


@dataclass(frozen=True, slots=True)
class Move:
    """Slots to move from shard ``source`` to shard ``target`` (ascending)."""

    source: int
    target: int
    slots: list[int]


def plan_moves(slot_map: SlotMap) -> list[Move]:
    """What a rebalance still has to move, in order: leaving shards give all
    their slots, active shards above their even share give their highest
    slots, and active shards below their share receive them (lowest ids
    first). Empty when the map is balanced and no shard is leaving."""
    active = sorted(i for i, st in slot_map.status.items() if st == SHARD_ACTIVE)
    if not active:
        return []
    quota = dict(zip(active, even_split(active), strict=True))
    owned: dict[int, list[int]] = {i: [] for i in slot_map.shards}
    for slot, owner in enumerate(slot_map.owners):
        owned[owner].append(slot)
    give: list[tuple[int, list[int]]] = []
    for shard_id in sorted(owned):
        slots = owned[shard_id]
        if shard_id not in quota:
            give.append((shard_id, slots))
        elif len(slots) > quota[shard_id]:
            give.append((shard_id, slots[quota[shard_id] :]))
    need = [(i, quota[i] - len(owned[i])) for i in active if len(owned[i]) < quota[i]]
    moves: list[Move] = []
    receivers = iter(need)
    target, wanted = next(receivers, (-1, 0))
    for source, slots in give:
        pos = 0
        while pos < len(slots) and wanted > 0:
            take = slots[pos : pos + wanted]
            moves.append(Move(source, target, take))
            pos += len(take)
            wanted -= len(take)
            if wanted == 0:
                target, wanted = next(receivers, (-1, 0))
    return moves


def apply_moves(slot_map: SlotMap, moves: Iterable[Move]) -> list[int]:
    """The owners after ``moves`` (for planning and figures; stores nothing)."""
    owners = list(slot_map.owners)
    for move in moves:
        for slot in move.slots:
            owners[slot] = move.target
    return owners
