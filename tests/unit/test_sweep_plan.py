"""Sweep planning: pure functions of cluster/tune.py (no Ray cluster is started)."""

import importlib.util
from dataclasses import replace
from pathlib import Path

import pytest

from cluster.resources import TRIAL_DRIVER_CPUS, plan_resources
from cluster.tune import RungConfig, SearchSpace, trial_run_config
from resnet_dist.config import ConfigError, RunConfig

REPO = Path(__file__).resolve().parents[2]


def test_cpu_trials_fit_beside_their_workers_and_ray_data():
    r = plan_resources(workers=1, max_concurrent=4, cpus=2, gpus=0, node_cores=2)
    # One whole CPU stays free for Ray Data; the rest is split among the running trials' workers
    # and the trials' own driver functions.
    assert r.max_concurrent * (r.workers * r.cpus_per_worker + TRIAL_DRIVER_CPUS) <= 1.0
    assert not r.use_gpu and r.data_path == "pipeline"
    r2 = plan_resources(workers=2, max_concurrent=8, cpus=16, gpus=0, node_cores=16)
    assert r2.max_concurrent * (r2.workers * r2.cpus_per_worker + TRIAL_DRIVER_CPUS) <= 15
    with pytest.raises(ConfigError, match="at least 2"):
        plan_resources(workers=1, max_concurrent=1, cpus=1, gpus=0, node_cores=1)


def test_in_process_trials_share_the_free_cpus_and_that_bounds_how_many_run():
    from cluster.resources import plan_in_process

    one = plan_in_process(max_concurrent=1, cpus=2, gpus=0, node_cores=2)
    assert (one.cpus_per_worker, one.threads, one.in_process, one.data_path) == (2, 2, True, "device")
    many = plan_in_process(max_concurrent=8, cpus=2, gpus=0, node_cores=2)
    assert (many.max_concurrent, many.cpus_per_worker, many.threads) == (2, 1, 1)   # no more than the CPUs
    gpu = plan_in_process(max_concurrent=8, cpus=16, gpus=4, node_cores=16)
    assert gpu.use_gpu and gpu.max_concurrent == 4 and gpu.cpus_per_worker == 4


def test_gpu_trials_take_one_gpu_per_worker():
    r = plan_resources(workers=4, max_concurrent=8, cpus=64, gpus=8, node_cores=64)
    assert r.use_gpu and r.max_concurrent == 2 and r.data_path == "device"
    with pytest.raises(ConfigError, match="GPUs"):
        plan_resources(workers=4, max_concurrent=1, cpus=8, gpus=2, node_cores=8)


def test_sample_becomes_a_valid_run_config():
    sample = {"flavor": "resnet32", "width": 2.0, "block": "bottleneck", "optimizer": "adamw", "lr_mult": 0.5,
              "weight_decay": 1e-4, "momentum": 0.9, "batch_size": 256, "label_smoothing": 0.1,
              "schedule": "cosine"}
    cfg = trial_run_config(RunConfig(), sample)
    assert cfg.model.flavor == "resnet32" and cfg.model.block == "bottleneck"
    assert cfg.optim.lr == pytest.approx(1e-3) and cfg.train.batch_size == 256


@pytest.mark.parametrize("space,match", [
    (SearchSpace(flavors=()), "empty search space"),
    (SearchSpace(flavors=("resnet7",)), "unknown model flavor"),
    (SearchSpace(lr_mult=(2.0, 1.0)), "lr multiplier"),
])
def test_bad_search_spaces_are_clear_errors(space, match):
    with pytest.raises(ConfigError, match=match):
        space.validate()


def test_rung_config_checks():
    with pytest.raises(ConfigError, match="--scheduler must be halving or asha"):
        RungConfig(scheduler="hyperband").validate()
    with pytest.raises(ConfigError, match="--first-rung-images must be >= 1"):
        RungConfig(first_rung_images=0).validate()
    rungs = RungConfig(max_epochs=2, first_rung_images=100, reduction_factor=3)
    assert rungs.milestones(1000, num_samples=9) == [100, 300]           # 9 -> 3 -> 1: no rung after that
    assert rungs.milestones(1000, num_samples=30) == [100, 300, 900]     # 30 -> 10 -> 3 -> 1
    assert replace(rungs, scheduler="asha").milestones(1000, num_samples=9) == [100, 300, 900]


def _sweep_main():
    spec = importlib.util.spec_from_file_location("sweep_job", REPO / "jobs" / "sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize("args,message", [
    (["--flavors", "resnet7"], "unknown model flavor 'resnet7'"),
    (["--lr-mult", "2", "1"], "lr multiplier range"),
    (["--first-rung-images", "0"], "--first-rung-images must be >= 1"),
    (["--pads", "2", "-1"], "crop paddings must be >= 0 pixels"),
    (["--val-subset", "-1"], "--val-subset must be >= 0"),
    (["--data-path", "pipeline"], "use --scheduler asha for Ray Train trials"),
    (["--num-samples", "0"], "--num-samples must be >= 1"),
    (["--data", "/nonexistent/cifar"], "manifest.json"),
    (["--storage", "nosuch://bucket/sweeps"], "pyarrow cannot open it"),
    (["--finetune-epochs", "-1"], "finetune.epochs, finetune.subset and finetune.batch_size must be >= 0"),
    (["--finetune-backbone-lr-scale", "-1"], "finetune.backbone_lr_scale must be > 0"),
    (["--finetune-optimizer", "lamb"], "invalid choice: 'lamb'"),
    (["--finetune-data", "/nonexistent/photos"], "fine-tuning data /nonexistent/photos does not exist"),
])
def test_sweep_bad_options_are_one_line_before_any_trial(args, message, tiny_data_dir, capsys):
    main = _sweep_main()
    with pytest.raises(SystemExit) as exit_:
        main(["--data", str(tiny_data_dir), *args])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and err.startswith("error:") and len(err.splitlines()) == 1
    assert message in err


def test_sweep_storage_that_is_not_writable_is_refused(tiny_data_dir, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(SystemExit):
        _sweep_main()(["--data", str(tiny_data_dir), "--storage", str(blocker / "sweeps")])
    assert "is not writable" in capsys.readouterr().err


def test_asha_rungs_survive_a_restart_of_the_sweep_driver(tmp_path):
    """A trial judged after a driver restart is compared with the trials before it, not only
    with those after the restart (Tune itself does not restore the scheduler's rungs)."""
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from cluster.tune import ResumableASHA

    def scheduler():
        return ResumableASHA(str(tmp_path / "tune" / "rungs.json"), time_attr="epoch", metric="val_acc",
                             mode="max", max_t=4, grace_period=1, reduction_factor=2)

    def report(s, trial_id, val_acc):
        trial = SimpleNamespace(trial_id=trial_id)
        s.on_trial_add(None, trial)
        return s.on_trial_result(None, trial, {"epoch": 1, "val_acc": val_acc})

    first = scheduler()
    assert report(first, "a", 0.6) == TrialScheduler.CONTINUE
    assert report(first, "b", 0.7) == TrialScheduler.CONTINUE
    restarted = scheduler()   # a new driver process: a fresh object, the same sweep directory
    assert report(restarted, "c", 0.3) == TrialScheduler.STOP   # below the median of 0.6, 0.7, 0.3
    # The driver died before Tune stopped "c": the next driver stops it when it reports again.
    assert report(scheduler(), "c", 0.3) == TrialScheduler.STOP
    fresh = ResumableASHA(str(tmp_path / "other.json"), time_attr="epoch", metric="val_acc", mode="max",
                          max_t=4, grace_period=1, reduction_factor=2)
    assert report(fresh, "c", 0.3) == TrialScheduler.CONTINUE   # what plain ASHA does after a restart


def test_own_finetuning_data_gets_the_own_data_defaults_unless_options_say_otherwise(tmp_path):
    import argparse

    from resnet_dist.config import FinetuneConfig
    from termui.sweep_args import add_sweep_args, sweep_config_from_args

    p = argparse.ArgumentParser()
    add_sweep_args(p)
    cifar = sweep_config_from_args(p.parse_args(["--preset", "local"])).finetune
    assert (cifar.epochs, cifar.lr) == (1, 0.005)   # the preset's short low-rate pass, for CIFAR-10
    own = sweep_config_from_args(p.parse_args(["--preset", "local", "--finetune-data", str(tmp_path)])).finetune
    defaults = FinetuneConfig()   # the measured own-data defaults
    assert (own.epochs, own.batch_size) == (0, 0)   # sized to the data
    assert (own.optimizer, own.lr, own.mode, own.backbone_lr_scale) == (
        defaults.optimizer, defaults.lr, "full", defaults.backbone_lr_scale)
    typed = sweep_config_from_args(p.parse_args(["--preset", "local", "--finetune-data", str(tmp_path),
                                                 "--finetune-epochs", "8", "--finetune-mode", "head"])).finetune
    assert (typed.epochs, typed.mode) == (8, "head")
    assert own.data == str(tmp_path.resolve())


def test_a_sweep_killed_before_its_first_experiment_state_starts_afresh(tmp_path):
    from cluster.tune import set_aside_incomplete_experiment

    tune_dir = tmp_path / "tune"
    tune_dir.mkdir()
    (tune_dir / "tuner.pkl").write_bytes(b"state")
    aside = set_aside_incomplete_experiment(tune_dir)
    assert aside is not None and (aside / "tuner.pkl").read_bytes() == b"state" and not tune_dir.exists()
    # A restorable experiment (tuner.pkl and an experiment state) and a new one are left alone.
    tune_dir.mkdir()
    (tune_dir / "tuner.pkl").write_bytes(b"state")
    (tune_dir / "experiment_state-2026-12-02_10-00-00.json").write_text("{}")
    assert set_aside_incomplete_experiment(tune_dir) is None and (tune_dir / "tuner.pkl").exists()
    assert set_aside_incomplete_experiment(tmp_path / "new") is None


def test_elastic_runs_ask_ray_train_for_a_range_of_workers():
    from dataclasses import replace

    from cluster.resources import check_workers

    fixed = plan_resources(4, 1, cpus=17, gpus=4, node_cores=16)
    assert fixed.num_workers() == 4
    assert replace(fixed, min_workers=2).num_workers() == (2, 4)
    assert replace(fixed, min_workers=4).num_workers() == 4   # min == max is a fixed size
    check_workers(4, 0)
    check_workers(4, 2)
    for workers, low in ((4, 5), (4, -1), (0, 0)):
        with pytest.raises(ConfigError, match="workers"):
            check_workers(workers, low)


class _Controller:
    """What SuccessiveHalving asks of Tune's controller: its trials, and stopping one (which,
    as in Tune, tells the scheduler through on_trial_remove)."""

    def __init__(self, scheduler, ids):
        from types import SimpleNamespace

        self.scheduler = scheduler
        self.trials = [SimpleNamespace(trial_id=t, status="PENDING", is_saving=False) for t in ids]
        for t in self.trials:
            scheduler.on_trial_add(self, t)

    def get_trials(self):
        return self.trials

    def stop_trial(self, trial):
        self.scheduler.on_trial_remove(self, trial)
        trial.status = "TERMINATED"

    def report(self, trial_id, images, val_acc):
        from ray.tune.schedulers import TrialScheduler

        trial = next(t for t in self.trials if t.trial_id == trial_id)
        trial.status = "RUNNING"
        action = self.scheduler.on_trial_result(self, trial, {"images_seen": images, "val_acc": val_acc})
        trial.status = {TrialScheduler.PAUSE: "PAUSED", TrialScheduler.STOP: "TERMINATED"}.get(action, "RUNNING")
        if action == TrialScheduler.STOP:
            self.scheduler.on_trial_complete(self, trial, {})
        return action

    def status(self):
        return {t.trial_id: t.status for t in self.trials}


def _halving(path, num_samples=4):
    from cluster.halving import SuccessiveHalving

    return SuccessiveHalving(str(path), metric="val_acc", mode="max", time_attr="images_seen",
                             milestones=[10, 20], reduction_factor=2, num_samples=num_samples)


def test_halving_pauses_every_trial_at_its_rung_until_the_rung_is_full_then_keeps_the_best(tmp_path):
    from ray.tune.schedulers import TrialScheduler as S

    from cluster.halving import rung_milestones

    assert rung_milestones(4000, 3, 180_000) == [4000, 12_000, 36_000, 108_000]
    c = _Controller(_halving(tmp_path / "rungs.json"), "abcd")
    # One trial at a time: each reaches rung 0 and waits; new trials go first.
    assert [c.report(t, 10, acc) for t, acc in zip("abc", (0.30, 0.50, 0.20))] == [S.PAUSE] * 3
    assert c.scheduler.choose_trial_to_run(c).trial_id == "d"
    # The last one fills the rung: the best half (b, d) go on, a and c are stopped where they wait.
    assert c.report("d", 10, 0.40) == S.CONTINUE
    assert c.status() == {"a": "TERMINATED", "b": "PAUSED", "c": "TERMINATED", "d": "RUNNING"}
    assert c.report("d", 15, 0.45) == S.CONTINUE            # an epoch's end between rungs
    assert c.report("d", 20, 0.55) == S.PAUSE                # rung 1 waits for b
    assert c.scheduler.choose_trial_to_run(c).trial_id == "b"   # resumed from its checkpoint
    assert c.report("b", 20, 0.60) == S.CONTINUE             # b beats d at rung 1
    assert c.status()["d"] == "TERMINATED"
    assert c.report("b", 40, 0.70) == S.CONTINUE             # past the last rung: on to max_t
    assert c.scheduler.choose_trial_to_run(c) is None


def test_halving_rungs_and_decisions_survive_a_restart_of_the_sweep_driver(tmp_path):
    from ray.tune.schedulers import TrialScheduler as S

    state = tmp_path / "rungs.json"
    c = _Controller(_halving(state), "abcd")
    for t, acc in zip("abc", (0.30, 0.50, 0.20)):
        c.report(t, 10, acc)
    # The driver dies; Tune restores every unfinished trial as PENDING, the scheduler as new.
    again = _Controller(_halving(state), "abcd")
    # a, b and c already wait at rung 0: only d may run, and nothing trains past the rung.
    assert again.scheduler.choose_trial_to_run(again).trial_id == "d"
    assert again.report("d", 10, 0.10) == S.STOP               # the worst of the four
    # b and a (0.50, 0.30) go on, resumed from their checkpoints; c, waiting, is stopped.
    assert again.status() == {"a": "PENDING", "b": "PENDING", "c": "TERMINATED", "d": "TERMINATED"}
    assert again.scheduler.choose_trial_to_run(again).trial_id == "a"
    # A scheduler without the saved state would have judged d alone, and kept it.
    fresh = _Controller(_halving(tmp_path / "other.json", num_samples=1), "d")
    assert fresh.report("d", 10, 0.10) == S.CONTINUE


def test_a_report_missing_from_result_json_is_taken_from_progress_csv(tmp_path: Path) -> None:
    """As a resumed trial's logs were found in CI: result.json lost the epoch-1 report, progress.csv kept it."""
    import csv

    import pandas as pd
    from ray.tune import Result

    from cluster.sweep import trial_reports
    from resnet_dist.report import trial_cost

    reports = [{"training_iteration": i, "step": 2 * i, "epoch": e, "images": n, "images_seen": seen, "val_acc": a,
                "epoch_s": 0.1, "time_this_iter_s": 0.2, "time_total_s": 0.2 * i}
               for i, e, n, seen, a in [(1, 1 / 3, 64, 64, 0.1), (2, 2 / 3, 64, 128, 0.27), (3, 1.0, 64, 192, 0.2),
                                        (4, 2.0, 192, 384, 0.49)]]
    kept = [r for r in reports if r["training_iteration"] != 3]   # result.json's, as Tune's metrics_dataframe
    with open(tmp_path / "progress.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(reports[0]))
        w.writeheader()
        w.writerows(reports)
    result = Result(metrics=reports[-1], checkpoint=None, error=None, path=str(tmp_path),
                    metrics_dataframe=pd.json_normalize(kept, sep="/"))
    df = trial_reports(result).sort_values("step")
    assert df["training_iteration"].tolist() == [1, 2, 3, 4]
    assert trial_cost(df.to_dict("records"), 1.0, 0.0, 2)["images"] == 384 == df["images_seen"].max()
    (tmp_path / "progress.csv").unlink()   # without one: result.json's reports alone
    assert trial_reports(result)["training_iteration"].tolist() == [1, 2, 4]
