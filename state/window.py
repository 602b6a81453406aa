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


@dataclass(frozen=True, slots=True)
class WindowEvent:
    item_id: str
    event_type: int  # index into the deployment's event types, 1-based (0 = none)
    ts: int  # epoch milliseconds
    offset: int  # input topic offset that brought the event


def _pack(event: WindowEvent) -> bytes:
    item = event.item_id.encode()
    return _ENTRY.pack(event.event_type, event.ts, event.offset, len(item)) + item


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
            self.packed = [_pack(event) for event in self.events]

    def apply(self, event: WindowEvent) -> bool:
        """Append `event` unless its offset was already applied; return whether it was."""
        if event.offset <= self.last_offset:
            return False
        self.events.append(event)
        self.packed.append(_pack(event))
        if len(self.events) > self.capacity:
            excess = len(self.events) - self.capacity
            del self.events[:excess]
            del self.packed[:excess]
        self.last_offset = event.offset
        self.total_events += 1
        return True

    def __len__(self) -> int:
        return len(self.events)

    def __iter__(self) -> Iterator[WindowEvent]:
        return iter(self.events)

    def to_bytes(self) -> bytes:
        header = _HEADER.pack(FORMAT_VERSION, len(self.events), self.last_offset, self.total_events)
        return header + b"".join(self.packed)

    @classmethod
    def from_bytes(cls, data: bytes, capacity: int) -> Window:
        version, count, last_offset, total_events = _HEADER.unpack_from(data, 0)
        if version != FORMAT_VERSION:
            raise ValueError(f"window format version {version} is not supported")
        position = _HEADER.size
        events: list[WindowEvent] = []
        packed: list[bytes] = []
        for _ in range(count):
            start = position
            event_type, ts, offset, item_len = _ENTRY.unpack_from(data, position)
            position += _ENTRY.size
            item = data[position : position + item_len].decode()
            position += item_len
            events.append(WindowEvent(item, event_type, ts, offset))
            packed.append(bytes(data[start:position]))
        if len(events) > capacity:  # a smaller capacity than when it was written
            events = events[len(events) - capacity :]
            packed = packed[len(packed) - capacity :]
        return cls(capacity, events, last_offset, total_events, packed)
