#!/usr/bin/env bash
# Set up the project (if needed) and run the checks: ruff, then pytest with the given
# arguments (e.g. `bash scripts/test.sh -q -k broker`).
# The tests start and stop their own broker, Redis and workers (see scripts/setup.sh).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
VENV=.venv

# tests/test_docker.py validates docker/compose.yml with `docker-compose config`, which needs no
# Docker engine. Best effort: as root with apt-get, install Debian's docker-compose (without
# the recommended engine); if that fails, those tests skip and the run goes on.
if ! command -v docker-compose >/dev/null 2>&1 && [ "$(id -u)" = 0 ] \
    && command -v apt-get >/dev/null 2>&1; then
    echo "scripts/test.sh: installing docker-compose for tests/test_docker.py" >&2
    apt_install() {
        DEBIAN_FRONTEND=noninteractive timeout 600 \
            apt-get install -y -qq --no-install-recommends docker-compose >/dev/null 2>&1
    }
    apt_install || { timeout 300 apt-get update -qq >/dev/null 2>&1 && apt_install; } \
        || echo "scripts/test.sh: could not install docker-compose; tests/test_docker.py" \
            "will skip its compose checks" >&2
fi

# tests/test_experiment_page.py renders the worker's experiments page in a real headless
# browser. Best effort, as above: Debian's chromium; without it that test skips.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] \
    && command -v apt-get >/dev/null 2>&1; then
    echo "scripts/test.sh: installing chromium for tests/test_experiment_page.py" >&2
    chromium_install() {
        DEBIAN_FRONTEND=noninteractive timeout 900 \
            apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1
    }
    chromium_install || { timeout 300 apt-get update -qq >/dev/null 2>&1 && chromium_install; } \
        || echo "scripts/test.sh: could not install chromium; tests/test_experiment_page.py" \
            "will skip" >&2
fi

"$VENV/bin/python" -m ruff check .
exec "$VENV/bin/python" -m pytest "$@"
