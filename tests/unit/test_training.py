import json

import pytest
import torch

from resnet_dist.checkpoint import load_checkpoint, load_model
from resnet_dist.config import RunConfig
from resnet_dist.local import fit_local
from resnet_dist.training import Sink



def tiny_cfg(data_dir, epochs=2):
    return RunConfig().replace(
        model={"flavor": "debug"}, data={"data_dir": str(data_dir)},
        optim={"lr": 0.05, "warmup_epochs": 0.5}, train={"epochs": epochs, "batch_size": 32, "eval_batch_size": 64},
    )


def test_fit_local_writes_checkpoints_and_metrics(tiny_data_dir, tmp_path):
    summary = fit_local(tiny_cfg(tiny_data_dir), tmp_path)
    assert [r["epoch"] for r in summary["history"]] == [1, 2]
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["test"]["confusion_matrix"] == summary["test"]["confusion_matrix"]
    assert sum(map(sum, saved["test"]["confusion_matrix"])) == 60
    model, ckpt = load_model(tmp_path / "best.pt")
    assert ckpt["epoch"] == summary["best_epoch"] and len(ckpt["classes"]) == 10
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 2
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


class StopAfter(Sink):
    """Simulates a kill right after report `k` was checkpointed (the sink runs after DirSink)."""

    def __init__(self, k):
        self.k, self.n = k, 0

    def report(self, record, history, checkpoint):
        self.n += 1
        if self.n == self.k:
            raise KeyboardInterrupt


def test_fit_local_resumes_where_it_stopped(tiny_data_dir, tmp_path):
    cfg = tiny_cfg(tiny_data_dir, epochs=3)
    straight = fit_local(cfg, tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        fit_local(cfg, tmp_path / "resumed", StopAfter(2))
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["epoch"] == 2
    resumed = fit_local(cfg, tmp_path / "resumed")
    assert [r["epoch"] for r in resumed["history"]] == [1, 2, 3]
    # Same weights, optimizer, schedule, RNG and data order: epoch 3 repeats the straight run's.
    for key in ("train_loss", "val_loss", "val_acc", "lr"):
        assert resumed["history"][2][key] == pytest.approx(straight["history"][2][key], rel=1e-4, abs=1e-6)


def test_reports_between_epoch_ends_and_a_resume_inside_an_epoch(tiny_data_dir, tmp_path):
    """report_every_images: 199 train images at batch 32 are 6 steps an epoch; a report every
    64 images is one every 2 steps, so 3 per epoch (the last at the epoch's end). A run killed
    after a report inside an epoch goes on from that step, not from the epoch's start."""
    cfg = tiny_cfg(tiny_data_dir).replace(train={"report_every_images": 64})
    straight = fit_local(cfg, tmp_path / "straight")["history"]
    assert [round(r["epoch"], 3) for r in straight] == [0.333, 0.667, 1, 1.333, 1.667, 2]
    assert [r["step"] for r in straight] == [2, 4, 6, 8, 10, 12]
    with pytest.raises(KeyboardInterrupt):
        fit_local(cfg, tmp_path / "resumed", StopAfter(4))   # inside epoch 2, after its step 2
    ckpt = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert (ckpt["epoch"], ckpt["extra"]["step_in_epoch"]) == (1, 2)
    resumed = fit_local(cfg, tmp_path / "resumed")["history"]
    assert [r["step"] for r in resumed] == [2, 4, 6, 8, 10, 12]
    for a, b in zip(resumed[4:], straight[4:]):   # the same batches, weights and schedule after the resume
        for key in ("train_loss", "val_acc", "lr", "param_checksum"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key


def test_train_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    from jobs.train import main

    def run(*args):
        """jobs/train.py's main() in this process: (exit code, stderr)."""
        with pytest.raises(SystemExit) as exit_:
            main(["--local", *args])
        return exit_.value.code, capsys.readouterr().err.strip()

    code, err = run("--data", str(tmp_path / "nope"))
    assert code == 2 and err.startswith("error:") and "manifest.json" in err and len(err.splitlines()) == 1
    code, err = run("--lr", "-1", "--data", str(tmp_path))
    assert code == 2 and "optim.lr" in err
    code, err = run("--model", "resnet7", "--data", str(tmp_path))
    assert code == 2 and "resnet7" in err


def test_each_rank_of_the_device_path_reads_an_equal_disjoint_share(tiny_data_dir):
    from resnet_dist.data import read_manifest
    from resnet_dist.local import train_loader, val_loader
    from resnet_dist.spec import RunSpec

    cfg = RunConfig().replace(data={"data_dir": str(tiny_data_dir)}, train={"batch_size": 32})
    spec = RunSpec.from_manifest(cfg, read_manifest(tiny_data_dir))
    whole = train_loader(spec, "cpu")
    shares = [train_loader(spec, "cpu", rank, 2) for rank in (0, 1)]
    n = spec.train_images   # 199: one image left out of the two equal shares
    assert [len(s.labels) for s in shares] == [n // 2] * 2 and len(whole.labels) == n
    assert torch.equal(torch.cat([s.images for s in shares]), whole.images[: n - n % 2])
    assert all(s.batch_size == 16 for s in shares) and len(shares[0]) == len(shares[1])
    assert shares[0].seed != shares[1].seed   # each rank its own shuffle and augmentation draws
    # Val: every world-th image, all of them counted once over the ranks.
    vals = [val_loader(spec, "cpu", rank, 2) for rank in (0, 1)]
    assert sum(len(v.labels) for v in vals) == len(val_loader(spec, "cpu").labels) == 41


def test_a_val_subset_keeps_every_class_and_rungs_report_inside_epochs(tiny_data_dir, tmp_path):
    """Prepared val is stored class by class: a subset of it is evenly spaced, not its first
    images; and train.report_at_images adds reports where the milestones fall."""
    import numpy as np

    from resnet_dist.data import read_manifest
    from resnet_dist.local import val_loader
    from resnet_dist.spec import RunSpec

    cfg = tiny_cfg(tiny_data_dir).replace(train={"val_subset": 20, "report_at_images": [64, 250]})
    spec = RunSpec.from_manifest(cfg, read_manifest(tiny_data_dir))
    labels = torch.cat([y for _, y in val_loader(spec, torch.device("cpu"))]).numpy()
    assert len(labels) == 20 and set(np.unique(labels)) == set(range(10))
    summary = fit_local(cfg, tmp_path)
    # 199 images at batch 32: 6 steps (192 images) an epoch; 64 -> step 2, 250 -> step 8 (epoch 2).
    assert [r["images_seen"] for r in summary["history"]] == [64, 192, 256, 384]
    assert all(r["val_images"] == 20 for r in summary["history"])
