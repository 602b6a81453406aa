"""The demo's worker process: start it, relay its stderr, wait for `/ready`, notice its death.

A worker serves `/ready` on its metrics port (200 once its model is loaded, its index built and
its partitions assigned and restored: stream/worker/metrics.py). The demo replays nothing
before that, and fails with one line (`RunFailed`, exit status 1) when the worker exits, is
killed, or is not ready within a bounded time.

That line names the cause. A worker killed by a signal was killed: the signal is the cause, and
its last log line (often librdkafka's routine `Coordinator load in progress: retrying`) is not
named. A worker that exited names its `kvrec: error:` line, else the exception that ended it (the
last line of a traceback), else nothing but its exit status (its output is above).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence

from kvrec.errors import RunFailed

STOP_GRACE_S = 60.0
ERROR_PREFIX = "kvrec: error: "


def free_port() -> int:
    """A TCP port nobody listens on right now (for the worker's metrics endpoint)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _ended(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


class WorkerProcess:
    """A `kvrec worker` child whose stderr is copied to ours; its error line explains a failure."""

    def __init__(self, command: Sequence[str], metrics_port: int) -> None:
        self.metrics_port = metrics_port
        self.error_line = ""  # its last `kvrec: error: ...` line
        self.in_traceback = False  # inside a Python traceback
        self.exception_line = ""  # its last line, when that ends a traceback
        self.process = subprocess.Popen(
            list(command),
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self._relay = threading.Thread(target=self._copy_stderr, name="worker-stderr", daemon=True)
        self._relay.start()
        # no proxy for a loopback health check, whatever http_proxy says
        self._http = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    @property
    def pid(self) -> int:
        return self.process.pid

    def _copy_stderr(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            sys.stderr.write(line)
            sys.stderr.flush()
            if line.strip():
                self._note(line.rstrip())

    def _note(self, line: str) -> None:
        self.exception_line = ""
        if line.startswith(ERROR_PREFIX):
            self.error_line = line.removeprefix(ERROR_PREFIX)
        elif line.startswith("Traceback (most recent call last):"):
            self.in_traceback = True
        elif self.in_traceback and not line[:1].isspace():
            self.in_traceback = False
            self.exception_line = line  # `ValueError: ...`, the traceback's end

    def cause(self, code: int) -> str:
        """What ended the worker, in its own words: nothing for a signal (the signal is the
        cause; its last log line was whatever it was doing then), else its `kvrec: error:` line,
        else the exception line that ends its output, else nothing."""
        if code < 0:
            return ""
        return self.error_line or self.exception_line

    def check_alive(self, when: str) -> None:
        """`RunFailed` naming how the worker ended and, if it exited, why (`cause`)."""
        code = self.process.poll()
        if code is None:
            return
        self._relay.join(timeout=5.0)  # the rest of its stderr, for the reason
        cause = self.cause(code)
        raise RunFailed(f"the worker {_ended(code)} {when}" + (f": {cause}" if cause else ""))

    def ready(self) -> bool:
        url = f"http://127.0.0.1:{self.metrics_port}/ready"
        try:
            with self._http.open(url, timeout=2.0) as reply:
                return bool(reply.status == 200)
        except (urllib.error.URLError, OSError):  # not listening yet, or 503 not ready
            return False

    def wait_until_ready(self, timeout_s: float, poll_s: float = 0.25) -> float:
        """Seconds until `/ready` answered 200; `RunFailed` if the worker ends or time runs out."""
        started = time.monotonic()
        while True:
            self.check_alive("before it was ready")
            if self.ready():
                return time.monotonic() - started
            if time.monotonic() - started > timeout_s:
                raise RunFailed(
                    f"the worker was not ready after {timeout_s:g} s (its /ready on port "
                    f"{self.metrics_port} never answered 200); if it is still exporting its "
                    "model or building its index, raise --ready-timeout"
                )
            time.sleep(poll_s)

    def stop(self) -> None:
        """SIGTERM (the worker commits and closes cleanly), SIGKILL if it hangs."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._relay.join(timeout=5.0)
