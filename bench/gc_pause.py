"""What a full garbage collection costs a serving process, before and after
`resnet_dist.inference.freeze_startup_heap`.

    python bench/gc_pause.py --checkpoint runs/bench-ft [--repeats 5]

The process imports what a Serve replica imports (cluster.serve: Ray, Serve, FastAPI, torch),
loads the checkpoint and freezes its graph as a replica does, then times `gc.collect()` (a full
collection, what Python runs by itself every so often) `--repeats` times, freezes the startup
heap and times it again. A full collection stops every thread of the process for its duration:
the event loop and the model thread alike.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run as a script from anywhere

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402


def full_collections_ms(repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        gc.collect()
        times.append((time.perf_counter() - t) * 1000)
    return times


def collections_row(state: str, repeats: int) -> dict:
    ms = full_collections_ms(repeats)
    return {"state": state, "tracked_objects": len(gc.get_objects()), "frozen_objects": gc.get_freeze_count(),
            "median_ms": round(statistics.median(ms), 1), "max_ms": round(max(ms), 1)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint file, run dir or sweep dir")
    p.add_argument("--repeats", type=int, default=5, help="full collections timed in each state (default: %(default)s)")
    args = p.parse_args(argv)

    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    importlib.import_module("cluster.serve")   # a replica's imports: Ray, Serve, FastAPI, torch
    from resnet_dist.checkpoint import CheckpointError
    from resnet_dist.inference import freeze_predictor, freeze_startup_heap, load_predictor
    from termui.cli import die

    try:
        predictor = freeze_predictor(load_predictor(args.checkpoint))   # what a replica holds
    except CheckpointError as e:
        die(str(e))
    rows = [collections_row("as started", args.repeats)]
    frozen = freeze_startup_heap()
    rows.append(collections_row("frozen", args.repeats))
    table = Table(title=f"full gc.collect() in a process with a replica's imports and model ({predictor.version})")
    for col in ("state", "objects a collection walks", "objects frozen", "median ms", "max ms"):
        table.add_column(col, justify="left" if col == "state" else "right")
    for r in rows:
        table.add_row(r["state"], f"{r['tracked_objects']:,}", f"{r['frozen_objects']:,}", str(r["median_ms"]),
                      str(r["max_ms"]))
    Console().print(table)
    print(json.dumps({"rows": rows, "frozen": frozen, "repeats": args.repeats}))


if __name__ == "__main__":
    main()
