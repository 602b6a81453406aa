"""A fake in-cluster Kubernetes API for --leave-on-scale-down: one StatefulSet's GET, a
service-account credentials folder, and the failures the worker must survive (403, a hang)."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

TOKEN = "fake-token"
NAMESPACE = "recs"


class FakeKubernetes:
    """Serves GET /apis/apps/v1/namespaces/recs/statefulsets/<name> with `replicas`; `status`
    other than 200 answers that instead; `delay_s` holds each answer back (a timeout)."""

    def __init__(self, replicas: int | None = 2, name: str = "kvrec-worker") -> None:
        self.replicas, self.name, self.status, self.delay_s = replicas, name, 200, 0.0
        self.requests: list[str] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                fake.requests.append(self.path)
                time.sleep(fake.delay_s)
                wanted = f"/apis/apps/v1/namespaces/{NAMESPACE}/statefulsets/{fake.name}"
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    self._answer(401, {"reason": "Unauthorized"})
                elif self.path != wanted:
                    self._answer(404, {"reason": "NotFound"})
                elif fake.status != 200:
                    self._answer(fake.status, {"reason": "Forbidden"})
                else:
                    spec = {} if fake.replicas is None else {"replicas": fake.replicas}
                    self._answer(200, {"kind": "StatefulSet", "spec": spec})

            def _answer(self, status: int, body: dict) -> None:
                raw = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                with contextlib.suppress(BrokenPipeError):  # the client gave up (a hung API)
                    self.wfile.write(raw)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeKubernetes:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def credentials(folder: Path) -> Path:
    """A service-account folder as Kubernetes mounts it: token, namespace (and a ca.crt,
    unused over the fake's plain HTTP)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "token").write_text(TOKEN + "\n")
    (folder / "namespace").write_text(NAMESPACE)
    (folder / "ca.crt").write_text("")
    return folder
