"""Replies as this package's clients receive them: text.

redis-py types a reply `bytes | str` because its types cannot follow the client's `decode_responses`
flag; every client here is made with `decode_responses=True` (sessions.store.connect), so each
reply is `str`. These casts say so once, where a reply enters our code, instead of at every use.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast


def optional_text(reply: bytes | str | None) -> str | None:
    return cast(str | None, reply)


def texts(reply: list[bytes | str]) -> list[str]:
    return cast(list[str], reply)


def text_set(reply: set[bytes | str]) -> set[str]:
    return cast(set[str], reply)


def text_dict(reply: dict[bytes | str, bytes | str]) -> dict[str, str]:
    return cast(dict[str, str], reply)


def stream_entries(reply: list[tuple[bytes | str | None, dict[bytes | str, bytes | str] | None]] | None,
                   ) -> list[tuple[str, dict[str, str]]]:
    """XRANGE's and XREVRANGE's entries: redis-py's type also allows a missing reply and entries without an id
    or fields (XAUTOCLAIM's deleted ones); a range of a stream always answers a list of whole entries."""
    return cast(list[tuple[str, dict[str, str]]], reply)


def members(reply: Sequence[object]) -> list[str]:
    """A sorted set's members, read without scores (redis-py types ZRANGE's reply for every flag at once)."""
    return cast(list[str], reply)


def scored_members(reply: Sequence[object]) -> list[tuple[str, float]]:
    """A sorted set's members, read `withscores=True`."""
    return cast(list[tuple[str, float]], reply)
