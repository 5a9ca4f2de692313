#!/usr/bin/env bash
# Set up (if needed) and run the whole stack on this machine: broker, Redis, a worker and
# simulated shoppers, with a live view. Arguments go to `streamrank up` (e.g. --duration 120).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
exec .venv/bin/streamrank up "$@"
