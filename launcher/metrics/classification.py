"""Classification metrics shared by the loop's evaluation and ``crate eval``."""

from __future__ import annotations

import numpy as np


def macro_f1(confusion: np.ndarray) -> float:
    """Mean over classes of F1 = 2 TP / (2 TP + FP + FN), from a (true, predicted) confusion matrix; a class with
    no true and no predicted example counts as F1 = 1 (nothing to get wrong)."""
    tp = np.diag(confusion).astype(np.float64)
    fp, fn = confusion.sum(0) - tp, confusion.sum(1) - tp
    denominator = 2 * tp + fp + fn
    return float(np.mean(np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 1.0)))
