#!/usr/bin/env bash
# The test command: set up from nothing, then run the whole suite
# (unit tests in seconds; integration tests on a real local Ray cluster and the real CIFAR-10).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest tests "$@"
