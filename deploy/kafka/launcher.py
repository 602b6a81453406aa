"""A real single-node Apache Kafka broker (KRaft, combined broker + controller) on loopback.

The broker's jars come from Maven Central through `deploy/kafka/pom.xml`, copied once into a
git-ignored cache keyed by the pom's hash (`KVREC_KAFKA_CACHE` overrides where). The launcher
formats a fresh log directory, starts `kafka.Kafka` on free loopback ports, waits until the
broker answers a metadata request, and stops it cleanly: SIGTERM to its process group, then
SIGKILL after a grace period, so no Java process is left behind.

    with LocalKafka() as kafka:
        print(kafka.bootstrap_servers)

    python -m deploy.kafka.launcher          # or: kvrec broker
"""

from __future__ import annotations

import argparse
import atexit
import base64
import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from model.errors import ConfigError

HERE = Path(__file__).resolve().parent
POM = HERE / "pom.xml"


def _require(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise ConfigError(f"`{tool}` not found: install {package} to run the local Kafka broker")
    return path


def jar_cache_dir() -> Path:
    digest = hashlib.sha256(POM.read_bytes()).hexdigest()[:12]
    root = Path(os.environ.get("KVREC_KAFKA_CACHE", HERE / "cache"))
    return root / f"jars-{digest}"


def ensure_jars() -> Path:
    """The folder of broker jars, fetched with Maven the first time (Maven's ~/.m2 caches too)."""
    target = jar_cache_dir()
    if (target / ".complete").exists():
        return target
    mvn = _require("mvn", "Maven (apt-get install maven)")
    _require("java", "a Java 17+ runtime (apt-get install openjdk-17-jre-headless)")
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    result = subprocess.run(
        [
            mvn, "-q", "-B", "-f", str(POM), "dependency:copy-dependencies",
            f"-DoutputDirectory={partial}", "-DincludeScope=runtime",
        ],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        tail = (result.stdout + result.stderr).strip().splitlines()[-15:]
        raise ConfigError("fetching the Kafka jars with Maven failed:\n" + "\n".join(tail))
    (partial / ".complete").touch()
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


LOG4J2 = """\
status = warn
appender.file.type = File
appender.file.name = file
appender.file.fileName = {log}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = file
logger.kafka.name = kafka
logger.kafka.level = WARN
logger.apache.name = org.apache.kafka
logger.apache.level = WARN
"""


class LocalKafka:
    """One broker process; a context manager that starts and stops it."""

    def __init__(
        self,
        data_dir: Path | str | None = None,
        port: int = 0,
        heap: str = "512m",
    ) -> None:
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="kvrec-kafka-"))
        self.port = port or free_port()
        self.controller_port = free_port()
        self.heap = heap
        self.process: subprocess.Popen[bytes] | None = None
        self.start_seconds: float | None = None
        self.stop_seconds: float | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "broker.log"

    def _write_config(self) -> Path:
        logs = self.data_dir / "logs"
        shutil.rmtree(logs, ignore_errors=True)
        settings = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{self.controller_port}",
            "listeners": (
                f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}"
            ),
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(logs),
            "num.partitions": "1",
            "auto.create.topics.enable": "false",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "4",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "4",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            "log.segment.bytes": str(64 * 1024 * 1024),
            "log.cleaner.dedupe.buffer.size": str(16 * 1024 * 1024),
        }
        path = self.data_dir / "server.properties"
        path.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
        (self.data_dir / "log4j2.properties").write_text(LOG4J2.format(log=self.log_file))
        return path

    def _java(self, jars: Path, main: str, *args: str, **popen: object) -> list[str]:
        return [
            _require("java", "a Java 17+ runtime (apt-get install openjdk-17-jre-headless)"),
            f"-Xmx{self.heap}",
            f"-Xms{self.heap}",
            "-XX:+UseG1GC",
            "-XX:TieredStopAtLevel=1",
            f"-Dlog4j2.configurationFile={self.data_dir / 'log4j2.properties'}",
            f"-Dkafka.logs.dir={self.data_dir}",
            "-cp",
            f"{jars}/*",
            main,
            *args,
        ]

    def start(self, timeout: float = 90.0) -> LocalKafka:
        started = time.monotonic()
        jars = ensure_jars()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = self._write_config()
        cluster_id = _random_cluster_id()
        formatted = subprocess.run(
            self._java(
                jars, "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(config)
            ),
            capture_output=True,
            text=True,
        )
        if formatted.returncode != 0:
            detail = formatted.stderr.strip()[-2000:]
            raise ConfigError(f"formatting Kafka storage failed: {detail}")
        stdout = open(self.data_dir / "broker.out", "wb")  # noqa: SIM115 (lives with the process)
        self.process = subprocess.Popen(
            self._java(jars, "kafka.Kafka", str(config)),
            stdout=stdout,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        atexit.register(self.stop)
        try:
            self._wait_ready(started + timeout)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - started
        return self

    def _wait_ready(self, deadline: float) -> None:
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": self.bootstrap_servers, "log_level": 0})
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise ConfigError(f"the Kafka broker exited at start:\n{self._log_tail()}")
            try:
                metadata = admin.list_topics(timeout=1.0)
                if metadata.brokers:
                    return
            except Exception:  # not up yet
                pass
            if time.monotonic() > deadline:
                raise ConfigError(f"the Kafka broker did not answer in time:\n{self._log_tail()}")
            time.sleep(0.2)

    def _log_tail(self, lines: int = 20) -> str:
        text = ""
        for name in ("broker.out", "broker.log"):
            path = self.data_dir / name
            if path.exists():
                text += "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) + "\n"
        return text.strip()

    def stop(self, grace: float = 20.0) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            started = time.monotonic()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            self.stop_seconds = time.monotonic() - started
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> LocalKafka:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def _random_cluster_id() -> str:
    """A KRaft cluster id: 16 random bytes, URL-safe base64 without padding (22 characters)."""
    return base64.urlsafe_b64encode(os.urandom(16)).decode().rstrip("=")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=9092, help="client port on 127.0.0.1")
    parser.add_argument("--data-dir", default=None, help="default: a temporary directory")
    parser.add_argument("--heap", default="512m")


def main(args: argparse.Namespace) -> int:
    kafka = LocalKafka(data_dir=args.data_dir, port=args.port, heap=args.heap)
    kafka.start()
    print(f"kafka: {kafka.bootstrap_servers} (started in {kafka.start_seconds:.1f}s; Ctrl-C stops)")
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        while not stop and kafka.process is not None and kafka.process.poll() is None:
            time.sleep(0.5)
    finally:
        kafka.stop()
        print(f"kafka: stopped in {kafka.stop_seconds or 0:.1f}s")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m deploy.kafka.launcher")
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))
