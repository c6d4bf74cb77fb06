"""Classification metrics in plain numpy: accuracy, confusion matrix, per-class P/R/F1."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """cm[i, j] = number of samples of true class i predicted as class j (int64)."""
    labels, preds = np.asarray(labels, np.int64), np.asarray(preds, np.int64)
    return np.bincount(labels * num_classes + preds, minlength=num_classes**2).reshape(num_classes, num_classes)


def accuracy(cm: np.ndarray) -> float:
    """Top-1 accuracy from a confusion matrix (0.0 for an empty one)."""
    total = cm.sum()
    return float(np.trace(cm) / total) if total else 0.0


def per_class(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class precision, recall, F1 and support; 0 where a ratio is undefined."""
    tp = np.diag(cm).astype(np.float64)
    predicted = cm.sum(axis=0).astype(np.float64)   # column sums: predicted as class j
    support = cm.sum(axis=1).astype(np.float64)     # row sums: truly class i
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support.astype(np.int64)}


def classification_report(cm: np.ndarray, classes: Sequence[str]) -> dict:
    """A JSON-able summary: accuracy, macro F1, per-class P/R/F1/support and the matrix."""
    pc = per_class(cm)
    return {
        "accuracy": accuracy(cm),
        "macro_f1": float(pc["f1"].mean()) if len(classes) else 0.0,
        "per_class": {
            name: {k: (int(v[i]) if k == "support" else float(v[i])) for k, v in pc.items()}
            for i, name in enumerate(classes)
        },
        "confusion_matrix": cm.tolist(),
        "classes": list(classes),
    }
