"""Prometheus metrics through Ray's metrics API.

Ray exports them, prefixed `ray_`, at each node's metrics endpoint (the port
`ray start --metrics-export-port` sets; Ray's Prometheus service-discovery file
lists them), so the names scraped are e.g. `ray_resnet_dist_train_images_per_second`.
"""

from __future__ import annotations

import threading
import time

from ray.util.metrics import Counter, Gauge


TRAIN_TAGS = ("run", "trial", "rank")
# Ray 2.60 evicts a gauge series that was not set again within two metric export
# intervals (2 x max(metrics_report_interval_ms, 1 s); 20 s by default), so a value set
# once per epoch (minutes) or once at start-up would be missing from most scrapes.
# Its last value is re-set this often, in s: under the shortest possible TTL (2 s).
GAUGE_REFRESH_S = 1.0


class GaugeKeeper:
    """Sets gauges and keeps re-setting their last values from a daemon thread, so
    they stay in the scrape between updates (and vanish with the process)."""

    def __init__(self, period_s: float = GAUGE_REFRESH_S) -> None:
        self._last: dict[tuple[int, tuple], tuple[Gauge, float, dict]] = {}
        self._lock = threading.Lock()
        self._period_s = period_s
        self._thread: threading.Thread | None = None

    def set(self, gauge: Gauge, value: float, tags: dict[str, str]) -> None:
        gauge.set(value, tags=tags)
        with self._lock:
            self._last[(id(gauge), tuple(sorted(tags.items())))] = (gauge, value, tags)
            if self._thread is None:
                self._thread = threading.Thread(target=self._refresh, name="gauge-keeper", daemon=True)
                self._thread.start()

    def _refresh(self) -> None:
        while True:
            time.sleep(self._period_s)
            with self._lock:
                held = list(self._last.values())
            for gauge, value, tags in held:
                gauge.set(value, tags=tags)


class TrainMetrics:
    """Per-worker training gauges, set once per epoch."""

    def __init__(self, tags: dict[str, str]) -> None:
        self.tags = {k: str(tags.get(k, "")) for k in TRAIN_TAGS}

        def gauge(name: str, description: str) -> Gauge:
            return Gauge(f"resnet_dist_{name}", description=description, tag_keys=TRAIN_TAGS)

        self.images_per_second = gauge("train_images_per_second", "training throughput of this worker, images/s")
        self.step_seconds = gauge("train_step_seconds", "mean wall time of one training step, s")
        self.data_wait_seconds = gauge("train_data_wait_seconds", "mean time a step waited for its batch, s")
        self.epoch_seconds = gauge("train_epoch_seconds", "wall time of the last epoch, s")
        self.loss = gauge("train_loss", "mean training loss of the last epoch")
        self.train_accuracy = gauge("train_accuracy", "training accuracy of the last epoch, 0..1")
        self.val_accuracy = gauge("val_accuracy", "validation accuracy after the last epoch, 0..1")
        self.epochs = Counter("resnet_dist_train_epochs", description="epochs completed", tag_keys=TRAIN_TAGS)
        self.keeper = GaugeKeeper()

    def observe(self, record: dict[str, float]) -> None:
        """One report of the training loop (resnet_dist.training.epoch_record)."""
        t, keep = self.tags, self.keeper.set
        # Per-rank throughput: this rank's share of the global images.
        keep(self.images_per_second, record["images_per_s"] / max(1, _world()), t)
        keep(self.step_seconds, record["step_s"], t)
        keep(self.data_wait_seconds, record["step_s"] * record["data_wait_frac"], t)
        keep(self.epoch_seconds, record["epoch_s"], t)
        keep(self.loss, record["train_loss"], t)
        keep(self.train_accuracy, record["train_acc"], t)
        keep(self.val_accuracy, record["val_acc"], t)
        if float(record["epoch"]).is_integer():
            self.epochs.inc(1, tags=t)


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
