#!/usr/bin/env bash
# Sets up the Python environment kvrec runs in, once per machine and lock file.
#
# The virtual environment lives outside the checkout, under ${KVREC_CACHE:-~/.cache/kvrec},
# named after the hash of deploy/requirements.lock, so that torch (several GB with its CUDA
# libraries) is installed once per machine and every clone (CI's fresh clones included)
# reuses it. pip's own cache makes a rebuild cheap too. `.venv` in the checkout is a link to it.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${KVREC_CACHE:-$HOME/.cache/kvrec}"
python="${KVREC_PYTHON:-python3}"
lock="$repo/deploy/requirements.lock"
command -v "$python" >/dev/null || { echo "kvrec setup: $python not found; install Python 3.11" >&2; exit 1; }
key="$("$python" -c 'import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],"rb").read()).hexdigest()[:12])' "$lock")"
venv="$cache/venv-$key"
if [ ! -f "$venv/.complete" ]; then
    echo "kvrec setup: creating $venv (first time on this machine: downloads torch, several minutes)" >&2
    rm -rf "$venv"
    mkdir -p "$cache"
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q -r "$lock"
    touch "$venv/.complete"
fi
# The project itself, editable, pointing at this checkout (a few seconds).
log="$(mktemp)"
if ! "$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$repo" >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    exit 1
fi
rm -f "$log"
ln -sfn "$venv" "$repo/.venv"
