#!/usr/bin/env bash
# Convert the real CIFAR-10 into Parquet shards at data/cifar10 (a no-op when done).
# CIFAR10_SOURCE may name another copy: an image-folder archive or cifar-10-batches-py/.
set -euo pipefail
cd "$(dirname "$0")/.."
source="${CIFAR10_SOURCE:-../shared/datasets/cifar10-jpeg.tar.xz}"
.venv/bin/python jobs/prepare_data.py "$source" data/cifar10
