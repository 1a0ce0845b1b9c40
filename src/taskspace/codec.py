"""Serialization of task arguments and results.

JSON (orjson) is the default; msgpack is optional (``taskspace[msgpack]``);
pickle is available only when a Space is created with ``serializer="pickle"``,
because unpickling a message from a shared store runs arbitrary code. A worker
refuses a pickle payload unless its own Space opted in.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from taskspace.errors import ConfigError, MissingDependency, SerializationError


@dataclass(frozen=True, slots=True)
class Codec:
    """A named pair of encode/decode functions; the name is stored with every payload."""

    name: str
    dumps: Callable[[Any], bytes]
    loads: Callable[[bytes], Any]

    def encode(self, value: Any) -> bytes:
        """Encode ``value``; raise SerializationError naming what could not be encoded."""
        try:
            return self.dumps(value)
        except (TypeError, ValueError, OverflowError, orjson.JSONEncodeError) as exc:
            raise SerializationError(
                f"cannot encode {_describe(value)} with the {self.name!r} serializer: {exc}"
            ) from None

    def decode(self, data: bytes) -> Any:
        """Decode ``data``; raise SerializationError if it is not valid for this codec."""
        try:
            return self.loads(data)
        except Exception as exc:
            raise SerializationError(f"cannot decode {self.name} payload: {exc}") from None


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:80]}{'…' if len(text) > 80 else ''}"


_JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


def _json_dumps(value: Any) -> bytes:
    return orjson.dumps(value, option=_JSON_OPTIONS)


def _msgpack() -> Codec:
    try:
        import msgpack
    except ImportError:
        raise MissingDependency(
            "the msgpack serializer needs msgpack: pip install 'taskspace[msgpack]'"
        ) from None

    def dumps(value: Any) -> bytes:
        data: bytes = msgpack.packb(value, use_bin_type=True)
        return data

    def loads(data: bytes) -> Any:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)

    return Codec("msgpack", dumps, loads)


JSON = Codec("json", _json_dumps, orjson.loads)
PICKLE = Codec("pickle", lambda v: pickle.dumps(v, protocol=5), pickle.loads)
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
