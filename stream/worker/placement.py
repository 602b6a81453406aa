"""Which partitions a member keeps standby copies of (`--standby-replicas N`).

librdkafka runs the assignor inside the client and lets no Python code replace it, so standby
placement cannot ride on the assignment as Kafka Streams' does. It is derived from what every
member can read: the group's membership and current assignment (the admin API's
describe_consumer_groups). The members, sorted by their id (`--instance-id` under static
membership, the broker's member id otherwise), form a ring; each member shadows the partitions
owned by the next N members after it (fewer when the group has fewer than N + 1 members).

    ring a -> b -> c -> a, N = 1:  a shadows b's partitions, b shadows c's, c shadows a's

So every owned partition has min(N, members - 1) standby copies, none on its owner. A member
that joins, leaves or is restarted under the same id changes the ring; each member recomputes
its set from the group's description every few seconds and after every rebalance
(standby.py). A killed member's partitions go wherever the cooperative-sticky assignor puts
them (the least loaded survivors): with N = members - 1 every survivor holds a copy, with
fewer a survivor without one restores the partition in full (docs in deploy/README.md).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Member:
    """One group member: its id on the ring and the input partitions it owns."""

    key: str
    partitions: frozenset[int]


def standby_partitions(members: Iterable[Member], me: str, replicas: int) -> frozenset[int]:
    """The input partitions `me` keeps standby copies of: those of the next `replicas`
    members after it on the ring of member ids (its own never; none if it is not a member)."""
    ring = sorted({member.key: member for member in members}.values(), key=lambda m: m.key)
    keys = [member.key for member in ring]
    if replicas <= 0 or me not in keys:
        return frozenset()
    start = keys.index(me)
    mine = ring[start].partitions
    shadowed: set[int] = set()
    for step in range(1, min(replicas, len(ring) - 1) + 1):
        shadowed |= ring[(start + step) % len(ring)].partitions
    return frozenset(shadowed - mine)
