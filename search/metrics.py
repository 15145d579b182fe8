"""Retrieval metrics over ranked lists (numpy in, floats out), the standard definitions.

For one query: ``ranked`` is the result ids best first (the query itself removed),
``relevant`` the set of ids that count as right answers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def average_precision(ranked: Sequence[int], relevant: set[int]) -> float:
    """Mean of precision@i over the ranks i of the relevant items; a relevant item never returned adds 0."""
    if not relevant:
        raise ValueError("average precision of a query with no relevant items is undefined")
    hits, total = 0, 0.0
    for i, r in enumerate(ranked, 1):
        if r in relevant:
            hits += 1
            total += hits / i
    return total / len(relevant)


def recall_at(ranked: Sequence[int], relevant: set[int], k: int) -> float:
    """Share of the relevant items found in the top k."""
    return len(set(ranked[:k]) & relevant) / len(relevant)


def precision_at(ranked: Sequence[int], relevant: set[int], k: int) -> float:
    """Share of the top k that is relevant (k in the denominator even if fewer were returned)."""
    return len(set(ranked[:k]) & relevant) / k


def knn_recall(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """ANN quality: mean share of the exact top k (truth [nq, >=k]) found in the approximate top k."""
    return float(np.mean([len(set(f[:k].tolist()) & set(t[:k].tolist())) / k for f, t in zip(found, truth)]))


def summarize(runs: list[tuple[Sequence[int], set[int]]], ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """mAP, recall@k and precision@k averaged over queries."""
    out = {"queries": float(len(runs)), "mAP": float(np.mean([average_precision(r, rel) for r, rel in runs]))}
    for k in ks:
        out[f"recall@{k}"] = float(np.mean([recall_at(r, rel, k) for r, rel in runs]))
    for k in ks:
        out[f"precision@{k}"] = float(np.mean([precision_at(r, rel, k) for r, rel in runs]))
    return out
