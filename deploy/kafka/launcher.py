"""A real single-node Apache Kafka broker (KRaft, combined broker + controller) on loopback.

The broker's jars come from Maven Central through `deploy/kafka/pom.xml`, copied once into a
git-ignored cache keyed by the pom's hash (`KVREC_KAFKA_CACHE` overrides where). The launcher
formats a fresh log directory, starts `kafka.Kafka` on loopback ports, waits until the broker
answers a metadata request, and stops it cleanly: SIGTERM to its process group, then SIGKILL
after a grace period, so no Java process is left behind. A data directory is formatted afresh
only when the launcher made it (its marker file, model/owned.py) or it is new or empty: one
holding anything else is refused, never wiped.

    with LocalKafka() as kafka:
        print(kafka.bootstrap_servers)

    kvrec broker                              # foreground; Ctrl-C stops it
    python -m kvrec.deploy.kafka.launcher start     # background; then `status`, `stop`
"""

from __future__ import annotations

import argparse
import atexit
import base64
import contextlib
import ctypes
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

from kvrec.errors import ConfigError
from kvrec.flags import PORT, number
from kvrec.model.owned import NotOwned, check_replaceable, claim_dir, foreign_entries, mark, remove_owned

HERE = Path(__file__).resolve().parent
POM = HERE / "pom.xml"
JAVA_HINT = "a Java 17+ runtime (e.g. apt-get install openjdk-17-jre-headless)"
MAVEN_HINT = "Maven (e.g. apt-get install maven)"
RECORD = "broker.json"  # in the data dir of a detached broker: pid and address


def _require(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise ConfigError(
            f"`{tool}` not found on PATH: install {package} to run the local Kafka broker"
        )
    return path


def jar_cache_dir() -> Path:
    """Where this pom's jars live: `<cache>/jars-<pom sha256 prefix>`."""
    digest = hashlib.sha256(POM.read_bytes()).hexdigest()[:12]
    root = Path(os.environ.get("KVREC_KAFKA_CACHE") or HERE / "cache")
    return root / f"jars-{digest}"


def ensure_jars() -> Path:
    """The folder of broker jars, fetched with Maven when missing (Maven's ~/.m2 caches too).

    Safe to call from several processes at once: a file lock lets one fetch while the others
    wait, and the folder appears by an atomic rename only once complete.
    """
    target = jar_cache_dir()
    if (target / ".complete").exists():
        return target
    _require("java", JAVA_HINT)
    mvn = _require("mvn", MAVEN_HINT)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".fetch.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / ".complete").exists():  # another process fetched while we waited
            return target
        partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
        remove_owned(partial)  # one a fetch that died left behind; nothing kvrec did not make
        claim_dir(partial, None, "kvrec broker: jar cache")
        print(f"kafka: fetching the broker jars with Maven into {target} (once)", file=sys.stderr)
        result = subprocess.run(
            [
                mvn, "-q", "-B", "-f", str(POM), "dependency:copy-dependencies",
                f"-DoutputDirectory={partial}", "-DincludeScope=runtime",
            ],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            remove_owned(partial)
            tail = (result.stdout + result.stderr).strip().splitlines()[-15:]
            raise ConfigError("fetching the Kafka jars with Maven failed:\n" + "\n".join(tail))
        (partial / ".complete").touch()
        remove_owned(target)  # incomplete (no .complete), and kvrec's, or refused
        partial.rename(target)
    return target


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


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
logger.started.name = kafka.server.KafkaRaftServer
logger.started.level = INFO
"""


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the process that started it dies (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class LocalKafka:
    """One broker process; a context manager that starts and stops it.

    `port=0` picks a free loopback port at start. With no `data_dir`, a temporary one is used
    and removed at stop. `overrides` adds or replaces `server.properties` settings.
    `die_with_parent` (Linux) makes the broker exit if the Python process (more exactly: the
    thread) that started it dies, even by SIGKILL; leave it off for a broker started from a
    short-lived thread or meant to outlive this process.
    """

    def __init__(
        self,
        data_dir: Path | str | None = None,
        port: int = 0,
        heap: str = "512m",
        die_with_parent: bool = False,
        overrides: dict[str, str] | None = None,
    ) -> None:
        self._own_dir = data_dir is None
        self.overrides = dict(overrides or {})
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.port = port
        self.controller_port = 0
        self.heap = heap
        self.die_with_parent = die_with_parent
        self.process: subprocess.Popen[bytes] | None = None
        self.start_seconds: float | None = None
        self.stop_seconds: float | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def log_file(self) -> Path:
        assert self.data_dir is not None, "not started"
        return self.data_dir / "broker.log"

    def _write_config(self, fresh: bool = True) -> Path:
        assert self.data_dir is not None
        logs = self.data_dir / "logs"
        if fresh:
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
            "num.network.threads": "2",
            "num.io.threads": "2",
            "background.threads": "2",
            **self.overrides,
        }
        path = self.data_dir / "server.properties"
        path.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
        (self.data_dir / "log4j2.properties").write_text(LOG4J2.format(log=self.log_file))
        return path

    def _java(self, jars: Path, main: str, *args: str) -> list[str]:
        assert self.data_dir is not None
        return [
            _require("java", JAVA_HINT),
            f"-Xmx{self.heap}",
            f"-Xms{self.heap}",
            "-XX:+UseG1GC",
            "-XX:TieredStopAtLevel=1",  # C1 only: starts faster, plenty for a test broker
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.data_dir / 'log4j2.properties'}",
            f"-Dkafka.logs.dir={self.data_dir}",
            "-cp",
            f"{jars}/*",
            main,
            *args,
        ]

    def start(self, timeout: float = 90.0) -> LocalKafka:
        """Format storage, start the broker, return once it answers a metadata request."""
        if self.process is not None:
            raise ConfigError(f"this broker is already running at {self.bootstrap_servers}")
        if self.data_dir is not None:  # refused before anything is fetched or started
            _check_data_dir(self.data_dir)
        started = time.monotonic()
        _require("java", JAVA_HINT)
        jars = ensure_jars()
        if self.port and not _port_is_free(self.port):
            raise ConfigError(
                f"port {self.port} on 127.0.0.1 is in use: stop what listens there or pick "
                "another port (--port 0 picks a free one)"
            )
        if self.data_dir is None:
            self.data_dir = Path(tempfile.mkdtemp(prefix="kvrec-kafka-"))
        claim_data_dir(self.data_dir)
        try:
            self._launch(jars)
            self._wait_ready(started + timeout)
        except BaseException:
            self.stop()  # the error carries the log tail; nothing of the broker is left
            raise
        self.start_seconds = time.monotonic() - started
        return self

    def _launch(self, jars: Path, fresh: bool = True) -> None:
        assert self.data_dir is not None
        self.port = self.port or free_port()
        if fresh:
            self.controller_port = free_port()
        config = self._write_config(fresh)
        if fresh:
            self._format(jars, config)
        with open(self.data_dir / "broker.out", "ab") as out:
            self.process = subprocess.Popen(
                self._java(jars, "kafka.Kafka", str(config)),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stop() signals all of it
                preexec_fn=_die_with_parent if self.die_with_parent else None,
            )
        atexit.register(self.stop)

    def _format(self, jars: Path, config: Path) -> None:
        formatted = subprocess.run(
            self._java(
                jars, "kafka.tools.StorageTool", "format",
                "-t", _random_cluster_id(), "-c", str(config),
            ),
            capture_output=True,
            text=True,
        )
        if formatted.returncode != 0:
            raise ConfigError(
                "formatting Kafka storage failed: " + _without_stack_frames(formatted.stderr)[-2000:]
            )

    # --- faults, for tests that bounce the broker under load -------------------------------
    def kill(self) -> None:
        """SIGKILL the broker (a crash): its data stays, `restart` brings it back."""
        process, self.process = self.process, None
        if process is not None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def restart(self, timeout: float = 90.0) -> None:
        """Start the broker again on the same ports and data, without formatting."""
        if self.process is not None:
            raise ConfigError(f"this broker is already running at {self.bootstrap_servers}")
        started = time.monotonic()
        self._launch(ensure_jars(), fresh=False)
        self._wait_ready(started + timeout)

    def freeze(self) -> None:
        """SIGSTOP the broker: connections stay open, nothing answers (until `thaw`)."""
        assert self.process is not None, "not running"
        os.killpg(self.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.process is not None, "not running"
        os.killpg(self.process.pid, signal.SIGCONT)

    def _wait_ready(self, deadline: float) -> None:
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": self.bootstrap_servers, "log_level": 0})
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise ConfigError(
                    f"the Kafka broker exited at start (code {self.process.returncode}); "
                    f"log tail:\n{self._log_tail()}"
                )
            with contextlib.suppress(Exception):  # not up yet
                if admin.list_topics(timeout=1.0).brokers:
                    return
            if time.monotonic() > deadline:
                raise ConfigError(
                    f"the Kafka broker did not answer in time; log tail:\n{self._log_tail()}"
                )
            time.sleep(0.2)

    def _log_tail(self, lines: int = 15) -> str:
        """The last lines of the broker's output and log, stack frames left out."""
        text = []
        for name in ("broker.out", "broker.log"):
            path = self.data_dir / name if self.data_dir else None
            if path is not None and path.exists():
                text += _without_stack_frames(path.read_text(errors="replace")).splitlines()[-lines:]
        return "\n".join(text)

    def stop(self, grace: float = 20.0, keep_dir: bool = False) -> None:
        """SIGTERM the broker's process group, SIGKILL after `grace` seconds; idempotent."""
        atexit.unregister(self.stop)
        process, self.process = self.process, None
        if process is not None:
            started = time.monotonic()
            _stop_group(process.pid, grace, wait=process.wait)
            self.stop_seconds = time.monotonic() - started
        if self._own_dir and not keep_dir and self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def detach(self) -> Path:
        """Leave the broker running after this process exits; returns its record file."""
        if self.process is None or self.data_dir is None:
            raise ConfigError("the broker is not running")
        if self.die_with_parent:
            raise ConfigError("a broker started with die_with_parent cannot be detached")
        atexit.unregister(self.stop)
        record = self.data_dir / RECORD
        record.write_text(json.dumps({
            "pid": self.process.pid,
            "bootstrap_servers": self.bootstrap_servers,
            "started_at": time.time(),
            "log": str(self.log_file),
        }))
        self.process = None
        self._own_dir = False
        return record

    def __enter__(self) -> LocalKafka:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def _is_earlier_broker_dir(data_dir: Path) -> bool:
    """A data dir this launcher formatted before it wrote its marker: its `server.properties`
    names the dir's own `logs` folder as the broker's log dir."""
    try:
        lines = (data_dir / "server.properties").read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return False
    return f"log.dirs={data_dir / 'logs'}" in lines


def _check_data_dir(data_dir: Path) -> None:
    if data_dir.is_dir() and not data_dir.is_symlink() and _is_earlier_broker_dir(data_dir):
        return
    try:
        check_replaceable(data_dir, "--data-dir")
    except NotOwned as exc:
        raise NotOwned(
            f"{exc} (the broker formats its data dir afresh at each start)"
        ) from None


def claim_data_dir(data_dir: Path) -> None:
    """Make (or take) the broker's data dir and mark it as kvrec's; refuse one holding files
    kvrec did not write: each start formats it afresh."""
    _check_data_dir(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    mark(data_dir, "kvrec broker: data dir")


def _owned_data_dir(data_dir: Path) -> bool:
    try:
        return data_dir.is_dir() and not foreign_entries(data_dir)
    except OSError:
        return False


def _stop_group(pid: int, grace: float, wait: object = None) -> None:
    """SIGTERM process group `pid`, wait up to `grace` s for its leader, then SIGKILL the group."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    if callable(wait):  # our own child: reap it
        with contextlib.suppress(subprocess.TimeoutExpired):
            wait(timeout=grace)
    else:
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)  # whatever is left of the group
    if callable(wait):
        wait()


def _without_stack_frames(text: str) -> str:
    return "\n".join(
        line for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith(("at ", "... "))
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    with contextlib.suppress(OSError):
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is gone
    return True


def _random_cluster_id() -> str:
    """A KRaft cluster id: 16 random bytes, URL-safe base64 without padding (22 characters).

    Like Kafka's own `Uuid.randomUuid`, never one that starts with "-": the storage tool would
    read it as an option (1 id in 64 otherwise)."""
    while True:
        cluster_id = base64.urlsafe_b64encode(os.urandom(16)).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


# ---- a detached broker, found again through the record in its data dir ----------------------

def default_data_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"kvrec-kafka-{os.getuid()}"


def running_broker(data_dir: Path) -> dict | None:
    """The record of the detached broker of `data_dir` if its process is alive, else None."""
    try:
        record = json.loads((data_dir / RECORD).read_text())
        pid = int(record["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not _alive(pid):
        return None
    with contextlib.suppress(OSError):  # a recycled pid is not our broker
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        if b"kafka.Kafka" not in cmdline or str(data_dir).encode() not in cmdline:
            return None
    return record


def start_detached(data_dir: Path, port: int, heap: str, timeout: float = 90.0) -> dict:
    if (record := running_broker(data_dir)) is not None:
        raise ConfigError(
            f"a broker is already running from {data_dir} at {record['bootstrap_servers']} "
            f"(pid {record['pid']}); stop it first"
        )
    kafka = LocalKafka(data_dir=data_dir, port=port, heap=heap).start(timeout=timeout)
    seconds = kafka.start_seconds
    kafka.detach()
    record = json.loads((data_dir / RECORD).read_text())
    record["start_seconds"] = seconds
    return record


def stop_detached(data_dir: Path, grace: float = 20.0) -> dict | None:
    """Stop the detached broker of `data_dir`; its record, or None if none was running."""
    record = running_broker(data_dir)
    if record is not None:
        _stop_group(int(record["pid"]), grace)
    if _owned_data_dir(data_dir) or _is_earlier_broker_dir(data_dir):  # else not our record
        with contextlib.suppress(OSError):
            (data_dir / RECORD).unlink()
    return record


# ---- command line: `kvrec broker [run|start|stop|status]`, `python -m kvrec.deploy.kafka.launcher` ---

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "action", nargs="?", default="run", choices=["run", "start", "stop", "status"],
        help="run: in the foreground until Ctrl-C (default); start: in the background; "
             "stop/status: the background broker of --data-dir",
    )
    parser.add_argument(
        "--port", type=PORT, default=9092, help="client port on 127.0.0.1 (0: any free port)"
    )
    parser.add_argument(
        "--data-dir", default=None,
        help="broker state and logs (formatted afresh at each start: it must be new, empty or "
             "one the launcher made; any other folder is refused); default for run: a "
             f"temporary folder removed at exit; for start/stop/status: {default_data_dir()}",
    )
    parser.add_argument("--heap", default="512m", help="JVM heap (-Xmx)")
    parser.add_argument(
        "--timeout", type=number(above=0), default=90.0, help="seconds to wait for it to answer"
    )


def main(args: argparse.Namespace) -> int:
    if args.action != "run":
        data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
        if args.action == "start":
            record = start_detached(data_dir, args.port, args.heap, args.timeout)
            print(f"kafka: {record['bootstrap_servers']} (pid {record['pid']}, started in "
                  f"{record['start_seconds']:.1f}s; log {record['log']})")
        elif args.action == "stop":
            record = stop_detached(data_dir)
            print("kafka: stopped" if record else f"kafka: no broker running from {data_dir}")
        else:
            record = running_broker(data_dir)
            if record is None:
                print(f"kafka: not running (data dir {data_dir})")
                return 1
            print(f"kafka: running at {record['bootstrap_servers']} (pid {record['pid']})")
        return 0
    kafka = LocalKafka(data_dir=args.data_dir, port=args.port, heap=args.heap, die_with_parent=True)
    kafka.start(timeout=args.timeout)
    print(f"kafka: {kafka.bootstrap_servers} (started in {kafka.start_seconds:.1f}s; Ctrl-C stops)",
          flush=True)
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not stopping and kafka.process is not None and kafka.process.poll() is None:
            time.sleep(0.5)
        if not stopping:
            raise ConfigError(f"the Kafka broker exited on its own; log tail:\n{kafka._log_tail()}")
    finally:
        kafka.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    print(f"kafka: stopped in {kafka.stop_seconds or 0:.1f}s")
    return 0


def _cli() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kvrec.deploy.kafka.launcher", description=__doc__.split("\n")[0]
    )
    add_arguments(parser)
    try:
        return main(parser.parse_args())
    except ConfigError as exc:
        print(f"kafka: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(_cli())
