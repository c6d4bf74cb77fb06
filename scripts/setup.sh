#!/usr/bin/env bash
# Create .venv and install the project with its test extra; a no-op when
# pyproject.toml has not changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "setup: installing resnet-dist and its dependencies into .venv (a few minutes the first time)"
  # pip's own chatter (index warnings, setuptools notices) goes to a log; shown if it fails.
  if ! { .venv/bin/python -m pip install -q --upgrade pip && .venv/bin/python -m pip install -q -e '.[test]'; } \
      >.venv/install.log 2>&1; then
    tail -n 30 .venv/install.log >&2
    echo "error: installing into .venv failed (whole log: .venv/install.log)" >&2
    exit 1
  fi
  rm -f .venv/.installed-*
  touch "$stamp"
fi
