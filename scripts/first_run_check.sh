#!/usr/bin/env bash
# What a new user's first run does: the README's main command, `scripts/main.sh`, on a clean
# clone of this commit with an empty HOME (no ~/.ray, so no Ray auth token) and no data/ or
# runs/, with the `smoke` preset and Serve on. Checks the sweep's outputs and the job log, then
# stops the Ray cluster it started. CI runs it after the test suite (.ci/run).
#
# The clone shares this checkout's .venv (a link): installing torch and Ray again costs minutes,
# and the install itself is what scripts/test.sh does from nothing on a fresh CI machine.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
[ -x .venv/bin/python ] || scripts/setup.sh
if .venv/bin/ray status >/dev/null 2>&1; then
  echo "first-run check: a Ray cluster is already running here; stop it first (ray stop)" >&2
  exit 1
fi

work=$(mktemp -d /tmp/first-run.XXXXXX)
clone="$work/resnet-dist"
git clone -q "$repo" "$clone"
ln -s "$repo/../shared" "$work/shared"     # ../shared beside the clone, as on every machine
ln -s "$repo/.venv" "$clone/.venv"
mkdir "$work/home"
log="$work/main.log"

cleanup() {
  # The cluster main.sh started (it leaves it running, with the model served).
  # Gracefully first: `ray stop --force` (SIGKILL) would leave Serve's HAProxy holding port 8000.
  HOME="$work/home" RAY_AUTH_MODE=token "$repo/.venv/bin/ray" stop >/dev/null 2>&1 ||
    HOME="$work/home" RAY_AUTH_MODE=token "$repo/.venv/bin/ray" stop --force >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

echo "first-run check: HOME=$work/home scripts/main.sh --preset smoke --serve (clone in $clone)"
start=$(date +%s)
if ! (cd "$clone" && env -u RAY_AUTH_TOKEN -u RAY_AUTH_TOKEN_PATH -u RAY_ADDRESS HOME="$work/home" \
      scripts/main.sh --preset smoke --serve) >"$log" 2>&1; then
  # Each failed submit is a 40-line traceback: the first lines and Ray's own logs say more.
  grep -v '^  ' "$log" | tail -n 40
  for f in "$clone/runs/ray-start.log" /tmp/ray/session_latest/logs/dashboard_agent.log; do
    [ -f "$f" ] && { echo "--- tail of $f"; tail -n 30 "$f"; }
  done
  echo "first-run check: FAILED: scripts/main.sh --preset smoke exited non-zero" >&2
  exit 1
fi
echo "first-run check: main.sh finished in $(( $(date +%s) - start )) s"

sweep="$clone/runs/sweep"
"$repo/.venv/bin/python" - "$sweep" "$log" <<'EOF'
import json, re, sys
from pathlib import Path

sweep, log = Path(sys.argv[1]), Path(sys.argv[2]).read_text()
problems = [f"missing {name}" for name in ("trials.csv", "best_config.json", "best.pt", "finetuned.pt",
                                           "report.md", "summary.json") if not (sweep / name).is_file()]
if not problems:
    summary = json.loads((sweep / "summary.json").read_text())
    if len(summary["trials"]) != 4:
        problems.append(f"{len(summary['trials'])} trials in summary.json, the smoke preset runs 4")
for needle in ("Job 'raysubmit_", "succeeded", "Ray Serve at http://"):
    if needle not in log:
        problems.append(f"the job log lacks {needle!r}")
if "Traceback" in log:
    problems.append("the job log holds a traceback")
# Lines Ray printed, not the project: actor/raylet-prefixed lines and Ray's timestamped log lines.
ray_line = re.compile(r"^(\x1b\[\d+m)?\((raylet|pid=|\w+ pid=)|^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}\s")
ray_lines = [line for line in log.splitlines() if ray_line.search(line)]
if len(ray_lines) > 40:
    problems.append(f"{len(ray_lines)} lines of Ray's own output (at most 40):\n" + "\n".join(ray_lines[:60]))
if not list((sweep / "tensorboard").glob("*/events.out.tfevents.*")):
    problems.append("no TensorBoard events in the sweep directory")
if problems:
    print("\n".join(log.splitlines()[-60:]))
    sys.exit("first-run check: FAILED: " + "; ".join(problems))
print(f"first-run check: ok ({len(log.splitlines())} lines of output, {len(ray_lines)} of them Ray's; "
      "sweep outputs in place)")
EOF
