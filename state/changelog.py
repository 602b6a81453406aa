"""The changelog record of one window: what a checkpoint produces and what recovery reads.

    key      the user id, UTF-8
    value    the window's bytes (`state.window`)
    header   kvrec.input_offset: the input offset of the last event applied to the window

A record whose input offset was not committed when recovery runs was produced by a checkpoint
that never finished: recovery skips it, and the input is processed again. A record without a
readable key or header was not written by a worker and is skipped too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

INPUT_OFFSET_HEADER = "kvrec.input_offset"


@dataclass(frozen=True, slots=True)
class ChangelogRecord:
    user_id: str
    window: bytes
    input_offset: int

    @property
    def key(self) -> bytes:
        return self.user_id.encode()

    @property
    def headers(self) -> dict[str, bytes]:
        return {INPUT_OFFSET_HEADER: str(self.input_offset).encode()}


def read_record(
    key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes | None]] | None
) -> ChangelogRecord | None:
    """The record a worker wrote, or None for anything else (no key, no value, no offset)."""
    if not key or value is None:
        return None
    try:
        user_id = key.decode()
    except UnicodeDecodeError:
        return None
    for name, raw in headers or []:
        if name == INPUT_OFFSET_HEADER and raw is not None:
            try:
                return ChangelogRecord(user_id, value, int(raw))
            except ValueError:
                return None
    return None
