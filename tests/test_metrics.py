"""Metrics against cases computed by hand."""

import numpy as np
import pytest

from search.metrics import average_precision, knn_recall, precision_at, recall_at, summarize


def test_average_precision_hand_cases():
    # relevant at ranks 1 and 3 of 2 relevant: (1/1 + 2/3) / 2
    assert average_precision([7, 4, 9, 1], {7, 9}) == pytest.approx((1 + 2 / 3) / 2)
    # one of two relevant never returned: (1/2) / 2
    assert average_precision([4, 7, 1], {7, 8}) == pytest.approx(0.25)
    assert average_precision([1, 2], {1, 2}) == 1.0
    assert average_precision([3, 4], {1}) == 0.0
    with pytest.raises(ValueError):
        average_precision([1], set())


def test_recall_and_precision_hand_cases():
    ranked = [5, 3, 8, 1, 9]
    rel = {3, 9, 42}
    assert recall_at(ranked, rel, 1) == 0 and recall_at(ranked, rel, 2) == pytest.approx(1 / 3)
    assert recall_at(ranked, rel, 5) == pytest.approx(2 / 3)
    assert precision_at(ranked, rel, 5) == pytest.approx(2 / 5)
    assert precision_at(ranked, rel, 10) == pytest.approx(2 / 10)  # fewer results still divide by k


def test_summarize_and_knn_recall():
    s = summarize([([1, 2], {1}), ([2, 1], {1})], ks=(1,))
    assert s["mAP"] == pytest.approx(0.75) and s["recall@1"] == 0.5 and s["precision@1"] == 0.5
    found = np.array([[1, 2, 3], [4, 5, 6]])
    truth = np.array([[3, 2, 9], [4, 5, 6]])
    assert knn_recall(found, truth, 3) == pytest.approx((2 / 3 + 1) / 2)
