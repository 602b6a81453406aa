#!/usr/bin/env bash
# Sets up the Python environment kvrec runs in.
#
# The dependencies live in one virtual environment per machine and lock file, outside the
# checkout, under ${KVREC_CACHE:-~/.cache/kvrec}/venv-<hash of deploy/requirements.lock>, so that
# torch (several GB with its CUDA libraries) is installed once and every clone (CI's fresh clones
# included) reuses it; pip's own cache makes a rebuild cheap too.
#
# Each checkout gets its own small `.venv` with no packages of its own: two .pth files put the
# shared dependencies and this checkout on its path, and `.venv/bin/kvrec` runs the CLI. Clones
# never step on each other (nothing of a checkout is installed into the shared environment).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${KVREC_CACHE:-$HOME/.cache/kvrec}"
python="${KVREC_PYTHON:-python3}"
lock="$repo/deploy/requirements.lock"
command -v "$python" >/dev/null || { echo "kvrec setup: $python not found; install Python 3.11" >&2; exit 1; }
key="$("$python" -c 'import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],"rb").read()).hexdigest()[:12])' "$lock")"
deps="$cache/venv-$key"
# What this script removes is only what it made: a folder it marked (.kvrec-owned), or an
# empty one. Anything else in its place is refused in one line, exit 2 (docs/configuration.md, "Nothing is
# deleted that kvrec did not make").
refuse_foreign() {
    echo "kvrec setup: error: $1 exists and was not made by kvrec setup (no .kvrec-owned in it): $2" >&2
    exit 2
}
made_here_or_empty() {
    [ -f "$1/.kvrec-owned" ] && [ ! -L "$1/.kvrec-owned" ] || [ -z "$(ls -A "$1" 2>/dev/null)" ]
}
if [ ! -f "$deps/.complete" ]; then
    echo "kvrec setup: creating $deps (first time on this machine: downloads torch, several minutes)" >&2
    if [ -L "$deps" ] || { [ -e "$deps" ] && ! made_here_or_empty "$deps"; }; then
        refuse_foreign "$deps" "remove it yourself, or set KVREC_CACHE to another folder"
    fi
    rm -rf "$deps"
    mkdir -p "$deps"
    touch "$deps/.kvrec-owned"  # before anything else: a half-made environment is still ours
    "$python" -m venv "$deps"
    "$deps/bin/python" -m pip install -q --upgrade pip
    "$deps/bin/python" -m pip install -q -r "$lock"
    touch "$deps/.complete"
fi
# An older setup installed checkouts into the shared environment (editable); undo that.
if [ -e "$deps/bin/kvrec" ]; then
    "$deps/bin/python" -m pip uninstall -q -y kvrec >/dev/null 2>&1 || true
fi

venv="$repo/.venv"
if [ ! -L "$venv" ] && [ -e "$venv" ] && [ ! -f "$venv/.kvrec-deps" ]; then
    refuse_foreign "$venv" "kvrec setup makes its own .venv there; move yours away"
fi
if [ -L "$venv" ] || [ "$(cat "$venv/.kvrec-deps" 2>/dev/null)" != "$deps" ]; then
    rm -rf "$venv"  # a link an older setup made, or this script's own .venv for another lock
    mkdir -p "$venv"
    echo pending >"$venv/.kvrec-deps"  # ours from the start; the real value is written last
    "$deps/bin/python" -m venv --without-pip "$venv"
    site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    deps_site="$("$deps/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    echo "$deps_site" >"$site/kvrec-deps.pth"
    echo "$repo" >"$site/kvrec-src.pth"
    echo "$deps" >"$venv/.kvrec-deps"
fi
# The `kvrec` command, written on every run so a checkout's entry point never goes stale.
printf '#!%s\nimport sys\n\nfrom kvrec.stream.cli import main\n\nsys.exit(main())\n' "$venv/bin/python" >"$venv/bin/kvrec"
chmod +x "$venv/bin/kvrec"
