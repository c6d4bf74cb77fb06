#!/usr/bin/env bash
# The main job on a fresh machine: set up, prepare the real CIFAR-10, train.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/prepare_cifar10.sh
exec .venv/bin/python jobs/train.py --local --preset quick "$@"
