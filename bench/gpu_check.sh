#!/usr/bin/env bash
# The GPU check of the training core, in one prepared run (< 8 min on one modern GPU).
# Needs Python with torch, numpy, pyarrow, pillow, rich and pytest -- not Ray: it uses
# resnet_dist alone, as the device machine has no Ray.
#
#   bench/gpu_check.sh [DATA]            # DATA: prepared Parquet, or the CIFAR-10 archive/folder
#   bench/gpu_check.sh --dry-run         # tiny made-up data, one step of each part (CPU tests)
#
# DATA defaults to data/cifar10 when prepared, else $CIFAR10_SOURCE, else
# ../shared/datasets/cifar10-jpeg.tar.xz (prepared into $WORK/cifar10 first, ~1 min, not timed).
# It prints, in order:
#   1. python, torch, CUDA, cuDNN and the GPU's name;
#   2. the unit tests that touch devices (tests/unit/test_devices.py: CPU and CUDA), and
#      the engine, augmentation and checkpoint tests;
#   3. ResNet-20, one epoch at the GPU defaults (jobs/train.py --local: CUDA, bf16 autocast,
#      channels_last, device-resident data): img/s and step time;
#   4. the gpu94 preset (ResNet-9) to 94% test accuracy: time to 94%, training steps only
#      (bench/time_to_accuracy.py: no process start, data loading or compile warm-up).
# PYTHON picks the interpreter (default: python3); WORK the scratch directory (default: a new
# temp dir); OUT, when set (the device tool), receives the logs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
dry=0
if [ "${1:-}" = --dry-run ]; then dry=1; shift; fi
WORK=${WORK:-$(mktemp -d)}
logdir=${OUT:-$WORK}
mkdir -p "$WORK" "$logdir"

section() { echo; echo "== $*"; }

section "1. versions"
"$PY" - <<'EOF'
import platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}")
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"GPU {i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, "
              f"capability {p.major}.{p.minor}, bf16 {torch.cuda.is_bf16_supported()}")
else:
    print("GPU: none (CUDA not available): every CUDA part below runs on the CPU instead")
EOF

section "2. unit tests that touch devices"
tests=(tests/unit/test_devices.py tests/unit/test_engine.py tests/unit/test_augment.py tests/unit/test_checkpoint.py
       tests/unit/test_models.py)
[ "$dry" = 1 ] && tests=(tests/unit/test_devices.py -k auto_picks)   # the suite runs the rest on the CPU
"$PY" -m pytest -q -p no:cacheprovider "${tests[@]}" 2>&1 | tee "$logdir/unit_tests.log" | tail -n 15

if [ "$dry" = 1 ]; then
  data="$WORK/tiny"
  "$PY" - "$data" <<'EOF'
import sys
from pathlib import Path
sys.path.insert(0, "bench")
from time_to_accuracy import make_tiny_dataset
make_tiny_dataset(Path(sys.argv[1]))
EOF
  data="$data/prepared"
  train_extra=(--preset quick --epochs 1 --train-subset 32 --batch-size 16 --eval-batch-size 16 --mlflow-uri off)
  tta_extra=(--dry-run)
else
  data=${1:-}
  if [ -z "$data" ]; then
    if [ -f data/cifar10/manifest.json ]; then data=data/cifar10
    else data=${CIFAR10_SOURCE:-../shared/datasets/cifar10-jpeg.tar.xz}; fi
  fi
  if [ ! -f "$data/manifest.json" ]; then
    echo "preparing $data -> $WORK/cifar10 (not timed)"
    "$PY" jobs/prepare_data.py "$data" "$WORK/cifar10" >"$logdir/prepare.log" 2>&1 || { tail "$logdir/prepare.log"; exit 1; }
    data="$WORK/cifar10"
  fi
  train_extra=(--model resnet20 --epochs 1 --mlflow-uri off)   # the GPU machine has no MLflow
  tta_extra=(--data "$data")
fi

section "3. ResNet-20, one epoch at the GPU defaults (jobs/train.py --local)"
"$PY" jobs/train.py --local --data "$data" --run-dir "$WORK/r20" "${train_extra[@]}" >"$logdir/train_r20.log" 2>&1 \
  || { tail -n 30 "$logdir/train_r20.log"; exit 1; }
"$PY" - "$WORK/r20/metrics.json" <<'EOF'
import json, sys
m = json.load(open(sys.argv[1]))
for r in m["history"]:
    print(f"epoch {r['epoch']}: {r['images_per_s']:.0f} img/s, step {1000 * r['step_s']:.2f} ms, "
          f"data wait {r['data_wait_frac']:.1%}, val acc {r['val_acc']:.2%}")
print(f"test acc {m['test']['accuracy']:.2%} (after {len(m['history'])} epoch(s))")
EOF

section "4. gpu94 preset: time to 94% test accuracy (bench/time_to_accuracy.py)"
"$PY" bench/time_to_accuracy.py "${tta_extra[@]}" 2>&1 | tee "$logdir/time_to_94.log" | grep -v '^{'
tail -n 1 "$logdir/time_to_94.log" > "$logdir/time_to_94.json"
echo
echo "gpu check: done (logs in $logdir)"
