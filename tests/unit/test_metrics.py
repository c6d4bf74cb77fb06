import numpy as np
import pytest

from resnet_dist.metrics import accuracy, classification_report, confusion_matrix, per_class


def test_hand_computed_example():
    # 3 classes, 8 samples.
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    preds = np.array([0, 0, 1, 1, 2, 2, 2, 0])
    cm = confusion_matrix(labels, preds, 3)
    np.testing.assert_array_equal(cm, [[2, 1, 0], [0, 1, 1], [1, 0, 2]])
    assert accuracy(cm) == pytest.approx(5 / 8)
    pc = per_class(cm)
    np.testing.assert_allclose(pc["precision"], [2 / 3, 1 / 2, 2 / 3])
    np.testing.assert_allclose(pc["recall"], [2 / 3, 1 / 2, 2 / 3])
    np.testing.assert_allclose(pc["f1"], [2 / 3, 1 / 2, 2 / 3])
    np.testing.assert_array_equal(pc["support"], [3, 2, 3])


def test_undefined_ratios_are_zero_and_report_is_plain():
    cm = confusion_matrix(np.array([0, 0]), np.array([0, 0]), 2)
    pc = per_class(cm)
    assert pc["precision"][1] == 0 and pc["recall"][1] == 0 and pc["f1"][1] == 0
    rep = classification_report(cm, ["a", "b"])
    assert rep["accuracy"] == 1.0
    assert rep["per_class"]["a"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2}
    assert rep["confusion_matrix"] == [[2, 0], [0, 0]]
    assert accuracy(np.zeros((2, 2), np.int64)) == 0.0
