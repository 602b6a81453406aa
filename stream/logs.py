"""The log lines of the commands that log (worker, tail, replay): text, or one JSON object a
line with `--log-format json`, librdkafka's own lines included (`stream/kafka_logs.py`)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from datetime import UTC, datetime

from kvrec.stream.kafka_logs import librdkafka_parts

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def add_logging_arguments(parser: argparse.ArgumentParser, default_level: str = "INFO") -> None:
    group = parser.add_argument_group("logging")
    group.add_argument("--log-level", default=default_level, type=str.upper, choices=LEVELS)
    group.add_argument(
        "--log-format", default="text", choices=FORMATS,
        help="json: one object a line with ts, level, logger and message (librdkafka's lines "
             "also with facility and client); a final `kvrec: error:` line stays plain text",
    )


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
        }
        parts = librdkafka_parts(record)
        if parts is not None:
            entry["facility"], entry["client"], entry["message"] = parts
        else:
            entry["message"] = record.getMessage()
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(args: argparse.Namespace) -> None:
    """Log to stderr at `--log-level` in `--log-format` (Python's warnings too). Like
    `logging.basicConfig`, it leaves a root logger that already has handlers alone."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if args.log_format == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=args.log_level, handlers=[handler])
    logging.captureWarnings(True)
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("faiss").setLevel(logging.WARNING)  # which CPU build it loaded
