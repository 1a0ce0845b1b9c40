"""WorkerReport: what one worker did, returned by :meth:`Worker.run`."""

from __future__ import annotations

from dataclasses import dataclass

from taskspace.backends.base import Outcome


@dataclass
class WorkerReport:
    """What one worker did: outcomes accepted by the store, and refusals.

    ``refused``: finishes refused as stale; ``leases_lost``: attempts abandoned
    because renew reported their lease lost; ``abandoned``: outcomes left to
    lease expiry at shutdown, plus the tasks held when the space was lost;
    ``wedged``: every slot was stuck past its timeout; ``space_lost``: the
    space was wiped or replaced and the worker stopped.
    """

    name: str
    succeeded: int = 0
    failed: int = 0
    retried: int = 0
    cancelled: int = 0
    released: int = 0
    refused: int = 0
    leases_lost: int = 0
    abandoned: int = 0
    wedged: bool = False
    space_lost: bool = False

    def count(self, outcome: Outcome, accepted: bool, state: str | None = None) -> None:
        """Tally one finish result: by ``state``, the event kind of the state
        the store moved the task to (``retried``, ``failed``...), when known;
        else by what the outcome asked for."""
        if not accepted:
            self.refused += 1
            return
        if state in ("succeeded", "failed", "retried", "cancelled"):
            field = state
        else:
            field = {"retry": "retried", "release": "released"}.get(outcome.kind, outcome.kind)
        setattr(self, field, getattr(self, field) + 1)
