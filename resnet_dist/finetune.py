"""Fine-tuning a trained checkpoint on a (possibly different) data set.

Pure PyTorch. `prepare_finetune` and `set_train_mode` are what
a Ray Train worker loop needs; `finetune_local` runs the whole job in one
process, with the engine's `train_epoch`/`evaluate` like `fit_local`.

Modes (`FinetuneConfig.mode`):
  * "head": only the classifier trains; the backbone, BN running statistics
    included, stays exactly as in the checkpoint.
  * "last-stage": the last stage and the head train; stem and earlier stages
    are frozen like the backbone in "head".
  * "full": every layer trains.
Every pretrained layer that trains runs at `backbone_lr_scale` x lr (the last
stage in "last-stage" too: it holds pretrained weights like any other backbone
layer); the head runs at 1 x lr.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from resnet_dist.checkpoint import build_checkpoint, load_checkpoint, model_from_checkpoint, unwrap
from resnet_dist.config import ConfigError, ModelConfig, RunConfig, section_from_dict
from resnet_dist.data import ensure_prepared, read_manifest, read_split
from resnet_dist.engine import EvalResult, evaluate, select_device
from resnet_dist.loader import ArrayLoader
from resnet_dist.metrics import accuracy, classification_report, confusion_matrix
from resnet_dist.models import ResNet
from resnet_dist.training import (
    BEST_CHECKPOINT, TrainingHooks, build_training, evaluate_checkpoint, load_loaders, run_epochs, write_json,
)

FINETUNE_MODES = ("head", "full", "last-stage")
HEAD_PREFIX = "fc."                 # parameter names of ResNet's classifier
SUMMARY_FILE = "finetune.json"
# Defaults sized to the data (auto_schedule). A small set at a large-data batch is a handful of
# steps an epoch: 1,260 images at batch 128 for 3 epochs are 30 optimizer steps, too few to
# adapt anything (26.9% test on a 10-class folder). So: a batch of about 1/20 of the train images
# (>= 20 steps an epoch, between MIN_BATCH and the source's batch) and enough epochs for MIN_STEPS.
MIN_STEPS = 300
MIN_BATCH = 16
STEPS_PER_EPOCH = 20
# Fine-tuning on a user's own data (other classes), jobs/finetune.py's defaults and the sweep's
# with --finetune-data: every layer, the head from the linear probe, SGD at 0.1, the backbone at
# half that; epochs and batch from the data's size. On a 10-class folder of 1,500 made-up images
# from a ResNet-20 CIFAR-10 checkpoint (bench/finetune_small.py, README): 99.7% test against
# 99.2% at lr 0.2, 98.3% with the backbone at the full rate, 95.6% from a random head, 54.2%
# with the backbone at 0.1x, 25.0% head only (the probe: 24.7%).
OWN_DATA_DEFAULTS = {"mode": "full", "optimizer": "sgd", "lr": 0.1, "backbone_lr_scale": 0.5}
# Weight decays the linear probe tries (on its val split), L2 on the weights of a mean-CE fit.
PROBE_WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2)


@dataclass(frozen=True)
class FinetuneConfig:
    mode: str = "head"              # "head" | "full" | "last-stage": which layers train (module docstring)
    reset_head: bool = True         # a new random head; forced when the class count differs
    backbone_lr_scale: float = 0.1  # lr multiplier of the pretrained layers that train; the head gets 1.0
    # Data with other classes: the new head starts from the linear probe fitted on the frozen
    # backbone (LP-FT, Kumar et al. 2022), not from random weights, so the first steps of full
    # fine-tuning do not wreck the pretrained features with a random head's gradients.
    probe_init: bool = True

    def validate(self) -> "FinetuneConfig":
        if self.mode not in FINETUNE_MODES:
            raise ConfigError(f"finetune.mode must be {'|'.join(FINETUNE_MODES)}, got {self.mode!r}")
        if not self.backbone_lr_scale > 0:   # written so that NaN fails too
            raise ConfigError(f"finetune.backbone_lr_scale must be > 0, got {self.backbone_lr_scale}")
        return self


def _trainable_prefixes(model: ResNet, mode: str) -> tuple[str, ...]:
    """Name prefixes of the parameters that train in `mode` ("" matches every name)."""
    if mode == "full":
        return ("",)
    if mode == "last-stage":
        return (f"stages.{len(model.stages) - 1}.", HEAD_PREFIX)
    return (HEAD_PREFIX,)


def prepare_finetune(
    ckpt: dict[str, Any], num_classes: int, ft: FinetuneConfig
) -> tuple[ResNet, ModelConfig, Callable[[str], float]]:
    """The checkpoint's network set up for fine-tuning on `num_classes` classes.

    Returns (model on the CPU, its ModelConfig with the new class count, the
    `lr_scale` for `build_optimizer`). The head is re-initialised (from the
    torch RNG: seed first) when `ft.reset_head` or the class count differs;
    parameters outside the mode's layers get requires_grad=False, so the
    optimizer never sees them. The training loop must use `set_train_mode`
    (`engine.train_epoch(..., train_mode=set_train_mode)`) so that frozen BN layers also keep their statistics.
    """
    ft.validate()
    source_cfg = section_from_dict(ModelConfig, ckpt["model_config"])
    model = model_from_checkpoint(ckpt)
    if ft.reset_head or num_classes != source_cfg.num_classes:
        model.reset_head(num_classes)
    trainable = _trainable_prefixes(model, ft.mode)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(trainable))

    def lr_scale(name: str) -> float:
        return 1.0 if name.startswith(HEAD_PREFIX) else ft.backbone_lr_scale

    return model, dataclasses.replace(source_cfg, num_classes=num_classes), lr_scale


def set_train_mode(model: nn.Module) -> None:
    """`model.train()`, except that BN layers whose parameters are all frozen stay in eval mode.

    In train mode a frozen BN layer would still normalise with batch statistics
    and overwrite its running statistics: the "frozen" backbone would drift, and
    the head would learn on features other than those it gets at inference.
    Call it wherever the loop would call model.train() (works on DDP/compiled
    wrappers too); `engine.train_epoch` takes it as `train_mode`.
    """
    model.train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d) and not any(p.requires_grad for p in m.parameters()):
            m.eval()


def finetune_local(
    ckpt_path: str | os.PathLike,
    data_dir: str | os.PathLike,
    run_dir: str | os.PathLike,
    cfg: RunConfig,
    ft: FinetuneConfig,
    hooks: TrainingHooks | None = None,
) -> dict[str, Any]:
    """Fine-tune the checkpoint at `ckpt_path` on the prepared data set `data_dir`, in this process.

    The architecture comes from the checkpoint (`cfg.model` is replaced by it)
    and the data from `data_dir` (`cfg.data` supplies subset and augmentation);
    optimizer, schedule and epochs come from `cfg`. Test accuracy is measured
    before (`finetune_start`: the source checkpoint, or for other classes the
    linear probe) and after, on the same test split. Writes `best.pt` (best
    validation epoch; a regular checkpoint for the new classes) and
    `finetune.json` into `run_dir`; returns what `finetune.json` holds.
    """
    hooks = hooks or TrainingHooks()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    source = load_checkpoint(ckpt_path)
    manifest = read_manifest(data_dir)
    classes = manifest["classes"]
    device = select_device()
    start, ft, before, before_kind = finetune_start(source, data_dir, ft, device)
    torch.manual_seed(cfg.train.seed)   # before prepare_finetune: it may draw a new head
    model, model_cfg, lr_scale = prepare_finetune(start, len(classes), ft)
    cfg = cfg.replace(model=dataclasses.asdict(model_cfg), data={"data_dir": str(data_dir)})
    # The backbone learnt on inputs normalised with the source data's statistics (and
    # frozen BN layers keep them), so the new data is normalised the same way.
    mean, std = source["mean"], source["std"]

    train_loader, val_loader, test_loader = load_loaders(cfg, mean, std, device)
    state = build_training(cfg, model_cfg, len(train_loader), device, model=model, lr_scale=lr_scale)

    def evaluate_on(loader: ArrayLoader) -> EvalResult:
        return evaluate(state.model, loader, len(classes), device, state.precision, cfg.train.eval_flip_tta)

    info = {
        "mode": ft.mode,
        "before": before_kind,
        "reset_head": ft.reset_head,
        "backbone_lr_scale": ft.backbone_lr_scale,
        "source_checkpoint": str(ckpt_path),
        "source_code_version": source["code_version"],
        "source_data_fingerprint": source["data_fingerprint"],
        "source_classes": source["classes"],
    }
    history: list[dict[str, float]] = []

    def checkpoint(epoch: int, record: dict[str, Any]) -> dict[str, Any]:
        return build_checkpoint(
            state.model, model_config=model_cfg, run_config=cfg.to_dict(), classes=classes, mean=mean, std=std,
            data_fingerprint=manifest["fingerprint"], epoch=epoch, metrics=record,
            extra={"finetune": info, "history": history},
        )

    run_epochs(state, cfg, train_loader, val_loader, len(classes), run_dir, checkpoint, history, hooks=hooks,
               train_mode=set_train_mode)
    unwrap(state.model).load_state_dict(load_checkpoint(run_dir / BEST_CHECKPOINT)["model_state"])
    after = evaluate_on(test_loader)
    summary = {
        "before": classification_report(before.confusion, classes),
        "before_kind": before_kind,
        "after": classification_report(after.confusion, classes),
        "config": {"run": cfg.to_dict(), "finetune": info},
        "history": history,
    }
    write_json(run_dir / SUMMARY_FILE, summary)
    return summary


def auto_schedule(n_train: int, source_batch: int, epochs: int = 0, batch_size: int = 0,
                  min_steps: int = MIN_STEPS) -> tuple[int, int]:
    """(epochs, global batch) for fine-tuning on `n_train` images; a non-zero `epochs` or
    `batch_size` is the user's and is kept. See MIN_STEPS."""
    if not batch_size:
        target = max(1, n_train // STEPS_PER_EPOCH)
        batch_size = max(MIN_BATCH, min(source_batch, 2 ** int(math.log2(target))))
    batch_size = max(1, min(batch_size, n_train))
    if not epochs:
        epochs = max(1, math.ceil(min_steps / max(1, n_train // batch_size)))
    return epochs, batch_size


@torch.no_grad()
def _features(model: ResNet, loader: ArrayLoader) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pooled backbone features of every image and of its mirror, and the labels (fp32)."""
    model.eval()
    f, ff, ys = [], [], []
    for x, y in loader:
        f.append(model.forward_features(x).float())
        ff.append(model.forward_features(x.flip(3)).float())
        ys.append(y)
    return torch.cat(f), torch.cat(ff), torch.cat(ys)


def _fit_head(feats: torch.Tensor, labels: torch.Tensor, num_classes: int, weight_decay: float) -> nn.Linear:
    """Multinomial logistic regression on fixed features, full batch, L-BFGS."""
    head = nn.Linear(feats.shape[1], num_classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=300, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(head(feats), labels) + weight_decay * head.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return head


def linear_probe(source: dict[str, Any], data_dir: str | os.PathLike,
                 device: torch.device | None = None) -> tuple[dict[str, Any], EvalResult]:
    """A linear head for `data_dir`'s classes on the frozen backbone of `source`: what the
    pretrained features give before any fine-tuning ("before" for data with other classes).

    Features of train (no augmentation), the weight decay picked on val, then the test split
    evaluated with flip TTA. Returns (a checkpoint dict: the source with this head and the new
    classes, from which fine-tuning can start; the test EvalResult)."""
    device = device or select_device()
    manifest = read_manifest(data_dir)
    classes = manifest["classes"]
    model = model_from_checkpoint(source, device)

    def features(split: str):
        arrays = read_split(data_dir, split)
        loader = ArrayLoader.from_numpy(arrays.images, arrays.labels, device=device, batch_size=500,
                                        mean=source["mean"], std=source["std"])
        return _features(model, loader)

    train_f, _, train_y = features("train")
    val_f, val_ff, val_y = features("val")
    test_f, test_ff, test_y = features("test")

    def tta_predict(head: nn.Linear, f: torch.Tensor, ff: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return (0.5 * (head(f) + head(ff))).argmax(1)

    scores = {}
    for wd in PROBE_WEIGHT_DECAYS:
        head = _fit_head(train_f, train_y, len(classes), wd)
        scores[wd] = ((tta_predict(head, val_f, val_ff) == val_y).float().mean().item(), head)
    wd, (val_acc, head) = max(scores.items(), key=lambda kv: kv[1][0])
    with torch.no_grad():
        logits = 0.5 * (head(test_f) + head(test_ff))
        loss = nn.functional.cross_entropy(logits, test_y).item()
    cm = confusion_matrix(test_y.cpu().numpy(), logits.argmax(1).cpu().numpy(), len(classes))
    result = EvalResult(loss=loss, accuracy=accuracy(cm), confusion=cm, images=int(cm.sum()))
    probe = {**source, "model_state": {**source["model_state"], "fc.weight": head.weight.detach().cpu().clone(),
                                       "fc.bias": head.bias.detach().cpu().clone()},
             "model_config": {**source["model_config"], "num_classes": len(classes)}, "classes": list(classes),
             "optimizer_state": None, "scheduler_state": None,
             "metrics": {"probe_val_acc": val_acc, "probe_weight_decay": wd, "test_acc": result.accuracy}}
    return probe, result


def finetune_start(source: dict[str, Any], data_dir: str | os.PathLike, ft: FinetuneConfig,
                   device: torch.device | None = None) -> tuple[dict[str, Any], FinetuneConfig, EvalResult, str]:
    """Where fine-tuning starts, and "before", the same way for the local and the Ray path.

    Same classes: "before" is the source checkpoint on the test split, and training starts
    from it. Other classes: "before" is the linear probe (`linear_probe`), and with
    `ft.probe_init` training starts from the probe's head (reset_head off). Returns (the
    checkpoint to start from, the config to train with, before's test EvalResult, what
    "before" is: "source checkpoint" | "linear probe")."""
    if list(source["classes"]) == list(read_manifest(data_dir)["classes"]):
        return source, ft, evaluate_checkpoint(source, data_dir, "test", device), "source checkpoint"
    probe, before = linear_probe(source, data_dir, device)
    if ft.probe_init:
        return probe, dataclasses.replace(ft, reset_head=False), before, "linear probe"
    return source, ft, before, "linear probe"


def finetune_run_config(source_run_config: dict[str, Any], *, epochs: int, lr: float, optimizer: str,
                        subset: int = 0, batch_size: int = 0) -> RunConfig:
    """The RunConfig of fine-tuning a checkpoint: its own run config with fine-tuning's optimizer,
    peak lr (warm-up over the first 10% of the epochs), epochs, train images per epoch (0 = all)
    and global batch (0 = the checkpoint's). Momentum, weight decay and augmentation stay."""
    return RunConfig.from_dict(source_run_config).replace(
        optim={"optimizer": optimizer, "lr": lr, "warmup_epochs": 0.1 * epochs}, data={"train_subset": subset},
        train={"epochs": epochs, **({"batch_size": batch_size} if batch_size else {})})


def finetune_job_local(src: dict[str, Any], source: Path, data: Path, out: Path, ft: FinetuneConfig, *,
                       epochs: int, lr: float, optimizer: str = "sgd", subset: int = 0,
                       batch_size: int = 0, hooks: TrainingHooks | None = None) -> dict[str, Any]:
    """jobs/finetune.py --local: `data` is prepared Parquet or a raw image folder/archive
    (prepared into out/finetune-data first); results land in out/finetuned/ (best.pt, finetune.json).
    `epochs` or `batch_size` 0: sized to the data (auto_schedule)."""
    data = ensure_prepared(data, out / "finetune-data")
    n_train = read_manifest(data)["counts"]["train"]
    epochs, batch_size = auto_schedule(min(n_train, subset or n_train),
                                       RunConfig.from_dict(src["run_config"]).train.batch_size, epochs, batch_size)
    cfg = finetune_run_config(src["run_config"], epochs=epochs, lr=lr, optimizer=optimizer, subset=subset,
                              batch_size=batch_size)
    return finetune_local(source, data, out / "finetuned", cfg, ft, hooks)
