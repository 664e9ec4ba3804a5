"""Power laws for scaling reports: ``L(x) = E + a * x^(-alpha)`` fitted to (size, loss) points.

``x`` is non-embedding parameters or training FLOPs; ``E`` is the irreducible loss. Without ``E`` the fit is a least
squares line in log-log space (exact for points on a pure power law; needs 3 points so that the fit can be judged,
spanning at least 4x so that it measures a slope rather than noise; the exponent's standard error is reported).
With ``E`` (4 or more points) the offset is searched on a grid below the smallest loss, refined around the best
value, and for each candidate the log-log line is fitted; the candidate with the smallest squared error in log space
wins. The search is deterministic and needs nothing beyond numpy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MIN_POINTS = 3
MIN_SPAN = 4.0  # largest x / smallest x of a fit


def fittable(x: Sequence[float]) -> bool:
    """Whether points at ``x`` can carry a power law: at least 3 distinct positive values spanning ``MIN_SPAN``."""
    values = sorted({float(v) for v in x if v and v > 0})
    return len(values) >= MIN_POINTS and values[-1] / values[0] >= MIN_SPAN


@dataclass(frozen=True)
class PowerLaw:
    coefficient: float  # a
    exponent: float  # alpha (the loss falls as x^-alpha)
    offset: float  # E, 0 when not fitted
    r2: float  # of the log-log line, on log(y - E)
    points: int
    exponent_stderr: float  # of the log-log slope (the offset held at its fitted value); nan without residual dof
    span: float  # largest x / smallest x

    def __call__(self, x) -> np.ndarray:
        return self.offset + self.coefficient * np.asarray(x, dtype=float) ** -self.exponent

    def describe(self, variable: str = "N") -> str:
        offset = f"{self.offset:.3g} + " if self.offset else ""
        # the exponent as written, -alpha: a loss that rises with x shows a positive power, not "^--"
        return (
            f"L = {offset}{self.coefficient:.3g}·{variable}^{-self.exponent:+.3f} ± {self.exponent_stderr:.3f} "
            f"(R² {self.r2:.3f}, {self.points} pts spanning {self.span:.3g}x)"
        )


def _line(log_x: np.ndarray, log_y: np.ndarray) -> tuple[float, float, float, float]:
    """Least-squares ``log_y = intercept + slope * log_x``: (slope, intercept, squared error, R²)."""
    slope, intercept = np.polyfit(log_x, log_y, 1)
    residual = log_y - (intercept + slope * log_x)
    error = float(residual @ residual)
    total = float(((log_y - log_y.mean()) ** 2).sum())
    return float(slope), float(intercept), error, 1.0 - error / total if total > 0 else 1.0


def _slope_stderr(log_x: np.ndarray, error: float, fitted: int) -> float:
    """The standard error of a least-squares slope: sqrt(s² / Sxx), s² the residual variance on ``len - fitted``
    degrees of freedom (nan without any)."""
    dof = len(log_x) - fitted
    if dof <= 0:
        return float("nan")
    return float(np.sqrt(error / dof / ((log_x - log_x.mean()) ** 2).sum()))


def fit_power_law(x: Sequence[float], y: Sequence[float], with_offset: bool = False) -> PowerLaw:
    """Fit ``y = E + a x^-alpha`` (``E = 0`` unless ``with_offset``). Raises ValueError for too few or non-positive
    points."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    needed = MIN_POINTS + int(with_offset)
    if x.shape != y.shape or len(x) < needed:
        raise ValueError(
            f"a power-law fit{' with an offset' if with_offset else ''} needs at least {needed} "
            f"(x, y) points, got {len(x)}"
        )
    if (x <= 0).any() or (y <= 0).any():
        raise ValueError("a power-law fit needs positive x and y")
    if len(set(x.tolist())) < 2:
        raise ValueError("a power-law fit needs at least two distinct x values")
    span = float(x.max() / x.min())
    if span < MIN_SPAN:
        raise ValueError(f"a power-law fit needs points spanning at least {MIN_SPAN:g}x, got {span:.3g}x")
    log_x = np.log(x)
    if not with_offset:
        slope, intercept, error, r2 = _line(log_x, np.log(y))
        stderr = _slope_stderr(log_x, error, 2)
        return PowerLaw(float(np.exp(intercept)), -slope, 0.0, r2, len(x), stderr, span)

    def error_at(offset: float) -> float:
        return _line(log_x, np.log(y - offset))[2]

    low, high = 0.0, float(y.min())
    best = 0.0
    for _ in range(4):  # grid, then three refinements around the best candidate
        candidates = np.linspace(low, high, 201)[:-1]  # below min(y): log(y - E) stays finite
        errors = [error_at(c) for c in candidates]
        index = int(np.argmin(errors))
        best = float(candidates[index])
        step = candidates[1] - candidates[0]
        low, high = max(0.0, best - step), min(float(y.min()), best + step)
    slope, intercept, error, r2 = _line(log_x, np.log(y - best))
    return PowerLaw(float(np.exp(intercept)), -slope, best, r2, len(x), _slope_stderr(log_x, error, 3), span)
