"""Serialization of task arguments and results.

JSON (orjson) is the default; msgpack is optional (``taskspace[msgpack]``);
pickle is available only when a Space is created with ``serializer="pickle"``,
because unpickling a message from a shared store runs arbitrary code. A worker
refuses a pickle payload unless its own Space opted in.

Values are never changed silently: JSON and msgpack refuse any value that
would not decode equal to itself (a ``datetime``, a tuple, ``nan``, a
non-string key, a set, a numpy array), naming the path of the offending part
(``args[0]['when']: datetime``) and the fix. The check is one decode and one
C-level comparison; the path is searched only when it fails. Encoded values
larger than ``max_size`` raise :class:`~taskspace.errors.PayloadTooLarge`.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import orjson

from taskspace.errors import ConfigError, MissingDependency, PayloadTooLarge, SerializationError

DEFAULT_MAX_PAYLOAD = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Codec:
    """A named pair of encode/decode functions; the name is stored with every payload.

    ``exact``: encoding refuses values that would not decode equal to
    themselves. ``max_size``: the largest encoded value accepted (None: any).
    """

    name: str
    dumps: Callable[[Any], bytes]
    loads: Callable[[bytes], Any]
    exact: bool = True
    max_size: int | None = None

    def limited(self, max_size: int | None) -> Codec:
        """This codec refusing encoded values above ``max_size`` bytes."""
        return replace(self, max_size=max_size)

    def encode(self, value: Any, what: str = "value") -> bytes:
        """Encode ``value``; raise SerializationError naming the part of ``what``
        that cannot be encoded exactly, or PayloadTooLarge."""
        try:
            data = self.dumps(value)
            same = not self.exact or self.loads(data) == value
        except (TypeError, ValueError, OverflowError, orjson.JSONEncodeError) as exc:
            raise SerializationError(self._refusal(value, what, str(exc))) from None
        if not same:
            raise SerializationError(self._refusal(value, what, "it would not decode equal"))
        if self.max_size is not None and len(data) > self.max_size:
            raise PayloadTooLarge(
                f"{what} encodes to {len(data):,} bytes, above max_payload={self.max_size:,}"
                " bytes; raise it with Space(..., max_payload=N) or pass large data by"
                " reference (a path or URL)"
            )
        return data

    def encode_call(self, args: Sequence[Any], kwargs: dict[str, Any]) -> bytes:
        """Encode a call's arguments as ``[args]`` or ``[args, kwargs]``; a
        refusal names the argument (``args[0]['when']``, ``kwargs['x']``)."""
        payload = [list(args), kwargs] if kwargs else [list(args)]
        try:
            return self.encode(payload, "arguments")
        except PayloadTooLarge:
            raise
        except SerializationError as exc:
            for value, root in ((list(args), "args"), (kwargs, "kwargs")):
                found = find_inexact(value, root, self._accepts)
                if found is not None:
                    raise SerializationError(self._explain(*found)) from None
            raise exc from None

    def _accepts(self, value: Any) -> bool:
        """Leaves this codec keeps exactly beyond plain JSON data."""
        if self.name != "msgpack":
            return False
        return isinstance(value, bytes) or (
            isinstance(value, datetime) and value.tzinfo is not None
        )

    def _refusal(self, value: Any, what: str, reason: str) -> str:
        found = find_inexact(value, what, self._accepts)
        if found is None:
            return f"cannot encode {what} ({_describe(value)}) with {self.name}: {reason}"
        return self._explain(*found)

    def _explain(self, path: str, kind: str) -> str:
        fix = _FIXES.get(kind, _DEFAULT_FIX)
        if self.name == "msgpack" and kind == "datetime":
            fix = "make it timezone-aware (datetime.now(timezone.utc)) or pass value.isoformat()"
        return f"cannot encode {path}: {kind} does not survive the {self.name} serializer; {fix}"

    def decode(self, data: bytes) -> Any:
        """Decode ``data``; raise SerializationError if it is not valid for this codec."""
        try:
            return self.loads(data)
        except Exception as exc:  # noqa: BLE001 - each codec raises its own error types
            raise SerializationError(f"cannot decode {self.name} payload: {exc}") from None


_DEFAULT_FIX = "convert it to str, int, float, bool, None, list or dict (with str keys)"
_FIXES = {
    "datetime": "pass value.isoformat(), or use serializer='msgpack' (timezone-aware only)",
    "date": "pass value.isoformat()",
    "tuple": "pass a list (tuples arrive as lists)",
    "float nan": "use None or a string such as 'nan'",
    "float inf": "use None or a string such as 'inf'",
    "non-string key": "use string keys (JSON object keys are strings)",
    "ndarray": "pass array.tolist()",
}


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:80]}{'…' if len(text) > 80 else ''}"


_PLAIN = (str, int, bool, type(None))


def _inexact_kind(value: Any) -> str | None:
    """What makes a leaf not round-trip, or None if it does."""
    kind = type(value)
    if kind in _PLAIN:
        return None
    if kind is float:
        if value != value:
            return "float nan"
        return "float inf" if value in (float("inf"), float("-inf")) else None
    if kind is tuple:
        return "tuple"
    return kind.__name__


def find_inexact(
    value: Any, path: str, accepts: Callable[[Any], bool] = lambda v: False
) -> tuple[str, str] | None:
    """The path and kind of the first part of ``value`` that is not plain
    JSON data (str, int, float, bool, None, list, dict with str keys), nor a
    leaf that ``accepts`` allows."""
    kind = type(value)
    if kind is list:
        for i, item in enumerate(value):
            found = find_inexact(item, f"{path}[{i}]", accepts)
            if found:
                return found
        return None
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str:
                return f"{path}[{key!r}]", "non-string key"
            found = find_inexact(item, f"{path}[{key!r}]", accepts)
            if found:
                return found
        return None
    if accepts(value):
        return None
    problem = _inexact_kind(value)
    return None if problem is None else (path, problem)


# Everything orjson would convert (datetimes, dataclasses, subclasses, numpy)
# is passed to a default that refuses it, so only exact JSON is produced.
_JSON_OPTIONS = (
    orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_DATACLASS
    | orjson.OPT_PASSTHROUGH_SUBCLASS
)


def _refuse(value: Any) -> Any:
    raise TypeError(f"{type(value).__name__} is not JSON data")


def _json_dumps(value: Any) -> bytes:
    return orjson.dumps(value, default=_refuse, option=_JSON_OPTIONS)


def _msgpack() -> Codec:
    try:
        import msgpack
    except ImportError:
        raise MissingDependency(
            "the msgpack serializer needs msgpack: pip install 'taskspace[msgpack]'"
        ) from None

    def dumps(value: Any) -> bytes:
        data: bytes = msgpack.packb(value, use_bin_type=True, datetime=True)
        return data

    def loads(data: bytes) -> Any:
        return msgpack.unpackb(data, raw=False, strict_map_key=False, timestamp=3)

    return Codec("msgpack", dumps, loads)


JSON = Codec("json", _json_dumps, orjson.loads)
PICKLE = Codec("pickle", lambda v: pickle.dumps(v, protocol=5), pickle.loads, exact=False)
SERIALIZERS = ("json", "msgpack", "pickle")


def get_codec(name: str) -> Codec:
    """Return the codec called ``name``: one of ``json``, ``msgpack``, ``pickle``."""
    if name == "json":
        return JSON
    if name == "msgpack":
        return _msgpack()
    if name == "pickle":
        return PICKLE
    raise ConfigError(f"unknown serializer {name!r}; valid: {', '.join(SERIALIZERS)}")


def decoder_for(name: str, *, allow_pickle: bool) -> Codec:
    """Return the codec that may decode a stored payload tagged ``name``.

    Pickle is refused unless ``allow_pickle``: a shared store must never be a
    path to code execution on a worker that did not opt in.
    """
    if name == "pickle" and not allow_pickle:
        raise SerializationError(
            "refusing a pickle payload: this Space did not opt in with serializer='pickle'"
        )
    try:
        return get_codec(name)
    except ConfigError:
        raise SerializationError(f"payload uses unknown serializer {name!r}") from None
