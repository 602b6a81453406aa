#!/usr/bin/env bash
# The test command: environment, lint, then the whole test suite against a real Kafka broker
# (KAFKA_BOOTSTRAP_SERVERS, else a Docker daemon via testcontainers, else the local launcher).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
bash deploy/setup.sh
.venv/bin/python -m ruff check .
exec .venv/bin/python -m pytest -q "$@"
