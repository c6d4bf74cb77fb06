"""Prometheus metrics through Ray's metrics API.

Ray exports them, prefixed `ray_`, at each node's metrics endpoint (the port
`ray start --metrics-export-port` sets; Ray's Prometheus service-discovery file
lists them), so the names scraped are e.g. `ray_resnet_dist_train_images_per_second`.
"""

from __future__ import annotations

from ray.util.metrics import Counter, Gauge

from resnet_dist.engine import EpochStats

TRAIN_TAGS = ("run", "trial", "rank")


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

    def observe_epoch(self, stats: EpochStats, record: dict[str, float]) -> None:
        t = self.tags
        # Per-rank throughput: this rank's share of the global images.
        self.images_per_second.set(stats.images_per_second / max(1, _world()), tags=t)
        self.step_seconds.set(stats.step_seconds, tags=t)
        self.data_wait_seconds.set(stats.data_wait_seconds / max(1, stats.steps), tags=t)
        self.epoch_seconds.set(stats.seconds, tags=t)
        self.loss.set(stats.loss, tags=t)
        self.train_accuracy.set(stats.accuracy, tags=t)
        self.val_accuracy.set(record["val_acc"], tags=t)
        self.epochs.inc(1, tags=t)


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
