"""A user's sliding window of recent events, stored as one compact binary value.

The window keeps the last `capacity` events of a user, enough for an exact cache refill
(N*(W-1)+1 for an N-layer encoder with attention window W), oldest first. Each entry holds the
item id as a string (ids are strings at the edges, and a string survives a model swap that
renumbers the catalog, or a new item that no model knows yet), the event type, the event time
and the input offset that brought it.

The window also records the input offset of the last event applied to it, so replaying
events after a crash (at-least-once delivery) never applies an event twice, and the total
number of events the user ever had.

Binary layout (little-endian), version 1:
    header  B version | I count | q last_offset | q total_events
    entry   B event_type | q ts | q offset | H len(item) | item utf-8 bytes
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

FORMAT_VERSION = 1
_HEADER = struct.Struct("<BIqq")
_ENTRY = struct.Struct("<BqqH")
MAX_ITEM_ID_BYTES = 0xFFFF
MAX_EVENT_TYPE = 0xFF
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class CorruptWindow(ValueError):
    """Stored bytes that do not decode to a window (the caller quarantines them)."""


@dataclass(frozen=True, slots=True)
class WindowEvent:
    item_id: str
    event_type: int  # index into the deployment's event types, 1-based (0 = none)
    ts: int  # epoch milliseconds
    offset: int  # input topic offset that brought the event


def pack_event(event: WindowEvent) -> bytes:
    """The event's binary entry; `ValueError` (nothing changed anywhere) if it has none: an
    item id that is not valid Unicode or longer than 65,535 UTF-8 bytes, a number out of range."""
    try:
        item = event.item_id.encode()
        return _ENTRY.pack(event.event_type, event.ts, event.offset, len(item)) + item
    except (UnicodeEncodeError, struct.error) as exc:
        raise ValueError(f"event cannot be stored in a window: {exc}") from None


@dataclass(frozen=True, slots=True)
class WindowSnapshot:
    events: list[WindowEvent]
    packed: list[bytes]
    last_offset: int
    total_events: int

    @property
    def first_index(self) -> int:
        """Index of `events[0]` in the user's whole history."""
        return self.total_events - len(self.events)


@dataclass(slots=True)
class Window:
    capacity: int
    events: list[WindowEvent] = field(default_factory=list)
    last_offset: int = -1
    total_events: int = 0
    # each event's binary entry, packed once when it arrives: a checkpoint serialises every
    # changed window, and re-packing ~100 entries per window stalled the loop every second
    packed: list[bytes] = field(default_factory=list, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.packed) != len(self.events):
            self.packed = [pack_event(event) for event in self.events]

    def apply(self, event: WindowEvent) -> bool:
        """Append `event` unless its offset was already applied; return whether it was.

        All or nothing: the entry is packed before anything changes, so an event that cannot
        be stored raises `ValueError` and leaves the window as it was."""
        if event.offset <= self.last_offset:
            return False
        entry = pack_event(event)
        self.events.append(event)
        self.packed.append(entry)
        if len(self.events) > self.capacity:
            excess = len(self.events) - self.capacity
            del self.events[:excess]
            del self.packed[:excess]
        self.last_offset = event.offset
        self.total_events += 1
        return True

    def extend_packed(self, events: list[WindowEvent], entries: list[bytes]) -> None:
        """Append new events (each after the last applied offset, in order) with their entries
        (`pack_event` of each, made by the caller while checking them): what `apply` of each
        does, in one call."""
        if not events:
            return
        self.events += events
        self.packed += entries
        excess = len(self.events) - self.capacity
        if excess > 0:
            del self.events[:excess]
            del self.packed[:excess]
        self.last_offset = events[-1].offset
        self.total_events += len(events)

    def __len__(self) -> int:
        return len(self.events)

    def __iter__(self) -> Iterator[WindowEvent]:
        return iter(self.events)

    def to_bytes(self) -> bytes:
        header = _HEADER.pack(FORMAT_VERSION, len(self.events), self.last_offset, self.total_events)
        return header + b"".join(self.packed)

    def snapshot(self) -> WindowSnapshot:
        """The window as it is now, for `restore` to undo the applies made after this call."""
        return WindowSnapshot(list(self.events), list(self.packed), self.last_offset,
                              self.total_events)

    def restore(self, snapshot: WindowSnapshot) -> None:
        self.events = list(snapshot.events)
        self.packed = list(snapshot.packed)
        self.last_offset = snapshot.last_offset
        self.total_events = snapshot.total_events

    @classmethod
    def from_bytes(cls, data: bytes, capacity: int) -> Window:
        """Decode a stored window; `CorruptWindow` for anything that is not exactly one."""
        try:
            return cls._decode(data, capacity)
        except CorruptWindow:
            raise
        except (struct.error, UnicodeDecodeError, ValueError) as exc:
            raise CorruptWindow(f"undecodable window ({len(data)} bytes): {exc}") from None

    @classmethod
    def _decode(cls, data: bytes, capacity: int) -> Window:
        version, count, last_offset, total_events = _HEADER.unpack_from(data, 0)
        if version != FORMAT_VERSION:
            raise CorruptWindow(f"window format version {version} is not supported")
        if total_events < count:
            raise CorruptWindow(f"header counts {total_events} events in all but holds {count}")
        position = _HEADER.size
        events: list[WindowEvent] = []
        packed: list[bytes] = []
        for _ in range(count):
            start = position
            event_type, ts, offset, item_len = _ENTRY.unpack_from(data, position)
            position += _ENTRY.size
            if position + item_len > len(data):
                raise CorruptWindow(f"an entry runs past the end ({len(data)} bytes)")
            item = data[position : position + item_len].decode()
            position += item_len
            if offset > last_offset:
                raise CorruptWindow(f"an entry's offset {offset} is after the last {last_offset}")
            events.append(WindowEvent(item, event_type, ts, offset))
            packed.append(bytes(data[start:position]))
        if position != len(data):
            raise CorruptWindow(f"{len(data) - position} bytes after the last of {count} entries")
        if len(events) > capacity:  # a smaller capacity than when it was written
            events = events[len(events) - capacity :]
            packed = packed[len(packed) - capacity :]
        return cls(capacity, events, last_offset, total_events, packed)
