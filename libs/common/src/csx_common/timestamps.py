"""Datetimes as stored and as sent: everything is UTC, but SQLite hands back naive datetimes."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import overload

from google.protobuf import timestamp_pb2


@overload
def utc(value: datetime) -> datetime: ...
@overload
def utc(value: None) -> None: ...
def utc(value: datetime | None) -> datetime | None:
    """The same instant, timezone-aware (a naive value was written as UTC)."""
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


@overload
def ts(value: datetime) -> timestamp_pb2.Timestamp: ...
@overload
def ts(value: None) -> None: ...
def ts(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    """A protobuf Timestamp for a stored datetime (None stays None)."""
    if value is None:
        return None
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(utc(value))
    return out
