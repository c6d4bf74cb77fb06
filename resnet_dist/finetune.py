"""Fine-tuning a trained checkpoint on a (possibly different) data set.

Pure PyTorch, and the same for the local and the Ray path: `plan_finetune` decides where a
run starts, what "before" is and the RunSpec it trains (resnet_dist.spec); the one training
loop runs it (resnet_dist.training, here or on Ray Train workers); `finish_finetune` writes
the same files for both (resnet_dist.outputs).

Modes (`FinetuneConfig.mode`, in resnet_dist.config):
  * "head": only the classifier trains; the backbone, BN running statistics
    included, stays exactly as in the checkpoint.
  * "last-stage": the last stage and the head train; stem and earlier stages
    are frozen like the backbone in "head".
  * "full": every layer trains.
Every pretrained layer that trains runs at `backbone_lr_scale` x lr (the last
stage in "last-stage" too: it holds pretrained weights like any other backbone
layer); the head runs at 1 x lr. The parts come from `ResNet.parameter_groups`.
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

from resnet_dist.checkpoint import (
    FINETUNED_CHECKPOINT, PROBE_CHECKPOINT, load_checkpoint, model_from_checkpoint, save_checkpoint,
)
from resnet_dist.config import FinetuneConfig, ModelConfig, RunConfig, section_from_dict
from resnet_dist.data import read_manifest, read_split
from resnet_dist.engine import EvalResult, select_device
from resnet_dist.loader import ArrayLoader
from resnet_dist.metrics import accuracy, classification_report, confusion_matrix
from resnet_dist.models import ResNet
from resnet_dist.outputs import evaluate_checkpoint, wrap_up
from resnet_dist.spec import RunSpec

SUMMARY_FILE = "finetune.json"
# Defaults sized to the data (auto_schedule). A small set at a large-data batch is a handful of
# steps an epoch: 1,260 images at batch 128 for 3 epochs are 30 optimizer steps, too few to
# adapt anything (26.9% test on a 10-class folder). So: a batch of about 1/20 of the train images
# (>= 20 steps an epoch, between MIN_BATCH and the source's batch) and enough epochs for MIN_STEPS.
MIN_STEPS = 300
MIN_BATCH = 16
STEPS_PER_EPOCH = 20
# Weight decays the linear probe tries (on its val split), L2 on the weights of a mean-CE fit.
PROBE_WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2)


def _trainable_prefixes(model: ResNet, mode: str) -> tuple[str, ...]:
    """Name prefixes of the parameters that train in `mode` ("" matches every name)."""
    groups = model.parameter_groups()
    if mode == "full":
        return ("",)
    if mode == "last-stage":
        return (*groups["last_stage"], *groups["head"])
    return groups["head"]


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
    head = model.parameter_groups()["head"]

    def lr_scale(name: str) -> float:
        return 1.0 if name.startswith(head) else ft.backbone_lr_scale

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
    # A sweep trial's rungs and its validation subset are the sweep's, not fine-tuning's.
    return RunConfig.from_dict(source_run_config).replace(
        optim={"optimizer": optimizer, "lr": lr, "warmup_epochs": 0.1 * epochs}, data={"train_subset": subset},
        train={"epochs": epochs, "report_at_images": [], "val_subset": 0,
               **({"batch_size": batch_size} if batch_size else {})})


@dataclass(frozen=True)
class FinetunePlan:
    """A fine-tuning run decided: what it trains (`spec`) and what "before" was."""

    spec: RunSpec
    before: EvalResult
    before_kind: str                  # "source checkpoint" | "linear probe"
    source: str                       # the source checkpoint's path
    info: dict[str, Any]              # provenance, kept in every checkpoint and in finetune.json


def plan_finetune(source_path: str | os.PathLike, data_dir: str | os.PathLike, out_dir: str | os.PathLike,
                  ft: FinetuneConfig, workers: int = 1, device: torch.device | None = None) -> FinetunePlan:
    """Fine-tuning of the checkpoint at `source_path` on the prepared data `data_dir`, the same
    for the local and the Ray path.

    "Before" and the start come from `finetune_start` (for other classes the linear probe,
    saved as out_dir/probe.pt, is where training starts). On the data the source was selected
    on (same fingerprint) training uses train + val, as model selection is done; a user's data
    keeps val held out. Epochs and batch come from `ft`, 0 meaning sized to the data
    (`auto_schedule`); the global batch is rounded to a multiple of `workers`. The inputs are
    normalised with the source's statistics: the backbone learnt on those, and frozen BN layers
    keep them."""
    ft.validate()
    source_path = str(source_path)   # a path or a URI (resnet_dist.storage)
    source = load_checkpoint(source_path)
    manifest = read_manifest(data_dir)
    start, ft, before, before_kind = finetune_start(source, data_dir, ft, device)
    init = source_path
    if start is not source:
        init = save_checkpoint(start, Path(out_dir) / PROBE_CHECKPOINT)
    splits = ("train", "val") if manifest["fingerprint"] == source["data_fingerprint"] else ("train",)
    n_train = sum(manifest["counts"][s] for s in splits)
    epochs, batch = auto_schedule(min(n_train, ft.subset or n_train),
                                  RunConfig.from_dict(source["run_config"]).train.batch_size, ft.epochs, ft.batch_size)
    batch = max(workers, batch - batch % workers)   # each worker gets batch / workers
    run = finetune_run_config(source["run_config"], epochs=epochs, lr=ft.lr, optimizer=ft.optimizer,
                              subset=ft.subset, batch_size=batch).replace(
        data={"data_dir": str(Path(data_dir).resolve())},
        model={**source["model_config"], "num_classes": len(manifest["classes"])})
    info = {"mode": ft.mode, "before": before_kind, "reset_head": ft.reset_head,
            "backbone_lr_scale": ft.backbone_lr_scale, "lr": ft.lr, "optimizer": ft.optimizer,
            "source_checkpoint": str(source_path), "source_code_version": source["code_version"],
            "source_data_fingerprint": source["data_fingerprint"], "source_classes": source["classes"],
            "train_splits": list(splits)}
    spec = RunSpec.from_manifest(run, manifest, mean=source["mean"], std=source["std"], train_splits=splits,
                                 init_checkpoint=str(init), finetune=ft, extra={"finetune": info})
    return FinetunePlan(spec, before, before_kind, str(source_path), info)


def finish_finetune(out_dir: str | os.PathLike, plan: FinetunePlan, tuned: dict[str, Any],
                    history: list[dict[str, Any]]) -> dict[str, Any]:
    """The end of fine-tuning, both paths: `tuned` (the run's last checkpoint when it trained on
    val, else its best on val) evaluated on the test split and saved as out_dir/finetuned.pt,
    what serving loads; out_dir/finetune.json holds before and after. Returns that summary."""
    return wrap_up(out_dir, tuned, history, plan.spec.run.data.data_dir, checkpoint_name=FINETUNED_CHECKPOINT,
                   summary_name=SUMMARY_FILE, test_key="after",
                   extra={"before": classification_report(plan.before.confusion, list(plan.spec.classes)),
                          "before_kind": plan.before_kind, "finetune": plan.info})
