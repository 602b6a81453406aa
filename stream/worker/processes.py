"""`kvrec worker --processes N`: N worker processes on one machine, one consumer group.

One worker process runs its loop on one core (the loop is Python; torch has one thread). To use
every core of a pod, the parent starts N children, each a plain `kvrec worker` with the same
flags plus `--processes 1`, its own `--instance-id <id>-<i>` (its static group membership and,
with exactly-once, its transactional id) and its own metrics port. The group splits the
partitions between them like between pods. Their windows do not collide on one `--state-dir`:
stores are per partition under the group's directory, and a partition is owned by one member
at a time (cooperative rebalancing revokes it, closing its store, before it is assigned again).

The parent does no Kafka work. It
- forwards SIGTERM/SIGINT to every child and waits for them (each checkpoints and leaves);
- exits with status 1 as soon as a child exits on its own (after stopping the others), so
  Kubernetes restarts the pod; children get SIGTERM if the parent dies (PR_SET_PDEATHSIG);
- serves `/health` and `/ready` on `--metrics-port`: 200 only when every child answers 200
  on its own port, each child's answer listed; children serve `/metrics`, `/health` and
  `/ready` on `--metrics-port + 1 + i` (with 0, each on a free port the parent picks; with
  -1, nobody serves anything). The parent's `/metrics` answers 404 naming those ports.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from kvrec.errors import ConfigError

log = logging.getLogger("kvrec.worker")

CHILD_PROBE_TIMEOUT_S = 2.0


def available_cores(cgroup_cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota (a pod's
    CPU limit: `200000 100000` is 2 cores), rounded up, at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    with contextlib.suppress(OSError, ValueError):
        quota, period = cgroup_cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, math.ceil(int(quota) / int(period)))
    return max(1, cores)


def process_count(requested: int) -> int:
    return requested if requested > 0 else available_cores()


def child_ports(metrics_port: int, count: int) -> list[int]:
    """Each child's metrics port: --metrics-port + 1 + i; -1 (off) stays off; 0 (any port):
    free ports picked here, so the parent knows where to ask."""
    if metrics_port < 0:
        return [-1] * count
    if metrics_port == 0:
        return [_free_port() for _ in range(count)]
    if metrics_port + count > 65_535:
        raise ConfigError(f"--metrics-port {metrics_port}: children need ports up to "
                          f"{metrics_port + count}, above 65535")
    return [metrics_port + 1 + i for i in range(count)]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def child_command(argv: Sequence[str], instance_id: str, metrics_port: int) -> list[str]:
    """The parent's own command line with the child's settings last (the last flag wins)."""
    return [sys.executable, "-m", "kvrec.stream.cli", *argv, "--processes", "1",
            "--instance-id", instance_id, "--metrics-port", str(metrics_port)]


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the parent dies (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _ask(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}",
                                    timeout=CHILD_PROBE_TIMEOUT_S) as response:
            return response.status, response.read().decode(errors="replace").strip()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace").strip()
    except OSError as exc:
        return 503, f"no answer ({exc.__class__.__name__})"


def aggregate(ports: Sequence[int], path: str) -> tuple[int, str]:
    """200 when every child answers 200 on `path`; the body lists each child's answer."""
    answers = [_ask(port, path) for port in ports]
    status = 200 if all(code == 200 for code, _ in answers) else 503
    lines = [f"worker {i} (port {port}): {code} {text}"
             for i, (port, (code, text)) in enumerate(zip(ports, answers, strict=True))]
    return status, "\n".join(lines) + "\n"


def serve_aggregate(ports: Sequence[int], port: int, host: str) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.startswith(("/health", "/ready")):
                status, text = aggregate(ports, "/health" if self.path.startswith("/health")
                                         else "/ready")
            else:
                status, text = 404, ("this is the parent of several worker processes: their "
                                     f"/metrics are on ports {', '.join(map(str, ports))}\n")
            body = text.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    try:
        server = Server((host, port), Handler)
    except OSError as exc:
        raise ConfigError(f"--metrics-host {host} --metrics-port {port}: cannot listen there "
                          f"({exc.strerror or exc})") from None
    threading.Thread(target=server.serve_forever, name="kvrec-probes", daemon=True).start()
    return server


def run_processes(argv: Sequence[str], count: int, instance_id: str, metrics_port: int,
                  metrics_host: str, poll_s: float = 0.5) -> int:
    """Start `count` workers, supervise them until SIGTERM/SIGINT or until one exits."""
    ports = child_ports(metrics_port, count)
    server = serve_aggregate(ports, metrics_port, metrics_host) if metrics_port >= 0 else None
    stopping = threading.Event()

    def stop(signum: int, frame: object) -> None:
        stopping.set()

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    children: list[subprocess.Popen] = []
    status = 0
    try:
        for index, port in enumerate(ports):
            command = child_command(argv, f"{instance_id}-{index}", port)
            children.append(subprocess.Popen(command, preexec_fn=_die_with_parent))
        log.info("started %d worker processes (pids %s, instance ids %s-0..%d, metrics ports %s)",
                 count, [c.pid for c in children], instance_id, count - 1, ports)
        while not stopping.is_set():
            exited = [(i, c.returncode) for i, c in enumerate(children) if c.poll() is not None]
            if exited:
                for index, code in exited:
                    log.error("worker process %d (pid %d) exited with status %s: stopping the "
                              "others", index, children[index].pid, code)
                status = 1
                break
            stopping.wait(poll_s)
    finally:
        for child in children:
            if child.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.send_signal(signal.SIGTERM)
        for child in children:
            code = child.wait()
            if code != 0 and not status:
                log.error("worker process pid %d exited with status %d", child.pid, code)
                status = 1
        if server is not None:
            server.shutdown()
            server.server_close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    log.info("worker processes stopped (status %d)", status)
    return status
