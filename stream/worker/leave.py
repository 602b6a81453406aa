"""Leave the consumer group for good as a static member (a scale-down, not a restart).

A static member (group.instance.id) that closes does not leave the group: the coordinator
keeps its partitions for it until the session timeout, so that a restart under the same id
takes them straight back. That is right for a restart and wrong for a member that is gone for
good: its partitions have no owner for the whole session timeout (46 s measured at 45 s).
Kafka's answer is the admin API's RemoveMembersFromConsumerGroup (a LeaveGroup request, v3+,
naming the group.instance.id; KIP-345), which librdkafka and confluent-kafka do not offer. This
module sends that request itself: FindCoordinator (v1) for the group, then LeaveGroup (v3) with
the instance id, over the broker's plain listener (the Kafka protocol's fixed binary layout;
a cluster with SSL or SASL listeners is not supported here: the member is left to time out,
with a warning).

The worker calls it after its consumer closed (the last checkpoint made) when it stops for
good: on SIGUSR2, or on every stop with `--leave-group-on-stop` (stream/worker/app.py).
"""

from __future__ import annotations

import logging
import socket
import struct

log = logging.getLogger(__name__)

_FIND_COORDINATOR, _LEAVE_GROUP = 10, 13
_CLIENT_ID = b"kvrec-leave"


def _string(value: str | None) -> bytes:
    if value is None:
        return struct.pack(">h", -1)
    raw = value.encode()
    return struct.pack(">h", len(raw)) + raw


def _request(sock: socket.socket, api_key: int, version: int, body: bytes) -> bytes:
    header = struct.pack(">hhih", api_key, version, 1, len(_CLIENT_ID)) + _CLIENT_ID
    message = header + body
    sock.sendall(struct.pack(">i", len(message)) + message)
    size = struct.unpack(">i", _read(sock, 4))[0]
    return _read(sock, size)[4:]  # past the correlation id


def _read(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the broker closed the connection")
        data += chunk
    return data


def _coordinator(bootstrap: tuple[str, int], group_id: str, timeout: float) -> tuple[str, int]:
    with socket.create_connection(bootstrap, timeout=timeout) as sock:
        body = _request(sock, _FIND_COORDINATOR, 1, _string(group_id) + b"\x00")
    error = struct.unpack(">h", body[4:6])[0]
    if error:
        raise ConnectionError(f"FindCoordinator: error code {error}")
    position = 6
    length = struct.unpack(">h", body[position : position + 2])[0]  # error message
    position += 2 + max(length, 0) + 4  # past it and the node id
    length = struct.unpack(">h", body[position : position + 2])[0]
    host = body[position + 2 : position + 2 + length].decode()
    port = struct.unpack(">i", body[position + 2 + length : position + 6 + length])[0]
    return host, port


def leave_group(kafka_config: dict[str, object], group_id: str, instance_id: str,
                timeout: float = 5.0) -> bool:
    """Remove the static member `instance_id` from `group_id` now; False (with a warning) if
    that could not be done: the group then frees its partitions after the session timeout."""
    protocol = str(kafka_config.get("security.protocol", "plaintext")).lower()
    if protocol != "plaintext":
        log.warning("cannot leave the group over %s (plain listeners only): its partitions "
                    "move when the session times out", protocol)
        return False
    try:
        first = str(kafka_config["bootstrap.servers"]).split(",")[0].strip()
        host, _, port = first.rpartition(":")
        coordinator = _coordinator((host.strip("[]"), int(port)), group_id, timeout)
        body = _string(group_id) + struct.pack(">i", 1) + _string("") + _string(instance_id)
        with socket.create_connection(coordinator, timeout=timeout) as sock:
            answer = _request(sock, _LEAVE_GROUP, 3, body)
        error = struct.unpack(">h", answer[4:6])[0]
        member_errors = _member_errors(answer[6:])
    except (OSError, ValueError, KeyError, struct.error) as exc:
        log.warning("leaving the group failed (%s): its partitions move when the session "
                    "times out", exc)
        return False
    if error or any(member_errors):
        log.warning("leaving the group refused (error codes %d, %s): its partitions move when "
                    "the session times out", error, member_errors)
        return False
    log.info("left the group %s as %s: its partitions move now", group_id, instance_id)
    return True


def _member_errors(body: bytes) -> list[int]:
    count = struct.unpack(">i", body[:4])[0]
    position, errors = 4, []
    for _ in range(max(count, 0)):
        for _field in range(2):  # member id, group instance id
            length = struct.unpack(">h", body[position : position + 2])[0]
            position += 2 + max(length, 0)
        errors.append(struct.unpack(">h", body[position : position + 2])[0])
        position += 2
    return errors
