"""bench/gpu_check.sh --dry-run: the GPU check's every part, on this CPU with tiny data, so
the script is known to run before it is spent on a lent GPU's few minutes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run_runs_every_part(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "WORK": str(tmp_path / "work"), "OUT": str(tmp_path / "out")}
    run = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    for part in ("1. versions", "2. unit tests", "3. ResNet-20", "4. gpu94 preset", "gpu check: done"):
        assert part in run.stdout, part
    assert "torch " in run.stdout and " passed" in run.stdout
    assert "img/s, step" in run.stdout   # the ResNet-20 epoch's figures
    result = json.loads((tmp_path / "out" / "time_to_94.json").read_text())
    assert result["preset"] == "gpu94" and result["dry_run"] and result["flavor"] == "resnet9"
    assert result["target"] == 0.94 and len(result["epochs"]) == 1 and 0 <= result["final_test_acc"] <= 1
    metrics = json.loads((tmp_path / "work" / "r20" / "metrics.json").read_text())
    assert metrics["config"]["model"]["flavor"] == "resnet20" and len(metrics["history"]) == 1
