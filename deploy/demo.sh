#!/usr/bin/env bash
# The main command: set up the environment, then run the whole product on this machine
# (local Kafka broker, train a small model, a worker, replay events, live figures).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
bash deploy/setup.sh
exec .venv/bin/kvrec demo "$@"
