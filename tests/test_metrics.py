import numpy as np
import pytest

from transferlab.evaluation.metrics import accuracy_interval, classification_metrics, expected_calibration_error


def test_metrics_of_a_known_binary_case():
    y = np.array([0, 0, 0, 1, 1, 1])
    proba = np.array([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.3, 0.7], [0.2, 0.8], [0.6, 0.4]])
    metrics = classification_metrics(y, proba, ["a", "b"])
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["confusion_matrix"] == [[2, 1], [1, 2]]
    assert metrics["per_class"]["a"] == {"precision": pytest.approx(2 / 3), "recall": pytest.approx(2 / 3),
                                         "f1": pytest.approx(2 / 3), "support": 3}
    # scores of b: positives 0.7, 0.8, 0.4 against negatives 0.1, 0.2, 0.6 -> 8 of 9 pairs ordered
    assert metrics["roc_auc"] == pytest.approx(8 / 9)
    low, high = metrics["accuracy_ci95"]
    assert 0.0 <= low < metrics["accuracy"] < high <= 1.0
    assert metrics["loss"] == pytest.approx(-np.mean(np.log([0.9, 0.8, 0.4, 0.7, 0.8, 0.4])))


def test_calibration_error_is_the_confidence_accuracy_gap():
    y = np.zeros(10, dtype=int)
    confident = np.tile([0.9, 0.1], (10, 1))  # 90% sure and always right: ECE 0.1
    assert expected_calibration_error(y, confident) == pytest.approx(0.1, abs=1e-6)
    assert expected_calibration_error(y, np.tile([1.0, 0.0], (10, 1))) == pytest.approx(0.0, abs=1e-6)


def test_bootstrap_interval_is_seeded_and_handles_perfect_accuracy():
    correct = np.r_[np.ones(90), np.zeros(10)]
    assert accuracy_interval(correct, seed=3) == accuracy_interval(correct, seed=3)
    low, high = accuracy_interval(correct)
    assert 0.82 < low < 0.9 < high < 0.97
    assert accuracy_interval(np.ones(50)) == [1.0, 1.0]


def test_auc_is_none_when_a_class_is_absent_and_multiclass_uses_one_vs_rest():
    proba = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.5, 0.4, 0.1]])
    assert classification_metrics(np.array([0, 1, 2, 0]), proba, list("abc"))["roc_auc"] == pytest.approx(1.0)
    assert classification_metrics(np.array([0, 1, 1, 0]), proba, list("abc"))["roc_auc"] is None


def test_bootstrap_interval_draws_its_resamples_in_batches_of_bounded_memory(monkeypatch):
    """All 2,000 resamples of a large split at once held 16 bytes per image per resample (934 MB for
    a 30,614-image test split); in batches the memory is bounded and the interval is the same."""
    import tracemalloc

    from transferlab.evaluation import metrics

    correct = (np.random.default_rng(0).random(40_000) < 0.97).astype(np.float64)  # 1.3 GB at once
    tracemalloc.start()
    batched = accuracy_interval(correct, seed=1)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 3 * metrics.BOOTSTRAP_BYTES
    small = correct[:2000]
    in_batches = accuracy_interval(small, seed=1)
    monkeypatch.setattr(metrics, "BOOTSTRAP_BYTES", 2**40)  # all resamples at once
    assert accuracy_interval(small, seed=1) == in_batches
    assert 0.96 < batched[0] < correct.mean() < batched[1] < 0.98
