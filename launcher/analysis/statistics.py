"""Seed statistics for ``crate compare``: mean ± std over seeds, Welch's t-test, the confidence interval of a
difference of means, and the verdict a reviewer reads.

Welch's test does not assume equal variances: ``t = (mean_a - mean_b) / sqrt(s_a^2/n_a + s_b^2/n_b)`` with the
Welch–Satterthwaite degrees of freedom ``df = (v_a + v_b)^2 / (v_a^2/(n_a-1) + v_b^2/(n_b-1))``, ``v = s^2/n``.
Student's t distribution is computed here in pure Python (no scipy): its CDF through the regularized incomplete beta
function, ``P(|T| > |t|) = I_x(df/2, 1/2)`` with ``x = df / (df + t^2)``, evaluated by Lentz's continued fraction,
and its quantiles by bisection on the CDF.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

SIGNIFICANCE = 0.05


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """The mean and the sample standard deviation (n - 1 in the denominator; None for a single value)."""
    if not values:
        raise ValueError("mean_std of no values")
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((value - mean) ** 2 for value in values) / (len(values) - 1))


def _continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (Lentz's method, as in Numerical Recipes' betacf)."""
    tiny, epsilon = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 10_000):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < epsilon:
            return result
    return result


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """``I_x(a, b)``, for ``a, b > 0`` and ``0 <= x <= 1``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    # the fraction converges fast on this side of the mean of the beta distribution; use the symmetry otherwise
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _continued_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """``P(T <= t)`` for Student's t distribution with ``df`` (not necessarily integer) degrees of freedom."""
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t > 0 else tail


def t_quantile(probability: float, df: float) -> float:
    """The ``t`` with ``P(T <= t) = probability`` (bisection on the CDF, to double precision)."""
    if not 0.0 < probability < 1.0:
        raise ValueError(f"t_quantile: probability {probability} is not in (0, 1)")
    if probability < 0.5:
        return -t_quantile(1.0 - probability, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < probability:
        low, high = high, 2.0 * high
    for _ in range(200):
        middle = (low + high) / 2.0
        if t_cdf(middle, df) < probability:
            low = middle
        else:
            high = middle
    return (low + high) / 2.0


def _welch_parts(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """(difference of means a - b, its standard error, Welch–Satterthwaite degrees of freedom)."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"Welch's test needs 2 or more values per sample (got {len(a)} and {len(b)})")
    (mean_a, std_a), (mean_b, std_b) = mean_std(a), mean_std(b)
    variance_a, variance_b = std_a**2 / len(a), std_b**2 / len(b)
    standard_error = math.sqrt(variance_a + variance_b)
    if standard_error == 0.0:  # every value identical within each sample: no spread to measure
        return mean_a - mean_b, 0.0, float(len(a) + len(b) - 2)
    df = (variance_a + variance_b) ** 2 / (variance_a**2 / (len(a) - 1) + variance_b**2 / (len(b) - 1))
    return mean_a - mean_b, standard_error, df


def welch_t_test(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """Welch's two-sample t-test: (t, degrees of freedom, two-sided p-value). Two samples without any spread give
    t = 0, p = 1 when their means are equal and t = ±inf, p = 0 when they are not."""
    difference, standard_error, df = _welch_parts(a, b)
    if standard_error == 0.0:
        return (0.0, df, 1.0) if difference == 0.0 else (math.copysign(math.inf, difference), df, 0.0)
    t = difference / standard_error
    return t, df, regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))


def difference_ci(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """The difference of means ``mean(a) - mean(b)`` and its ``level`` confidence interval (Welch): (difference,
    low, high)."""
    difference, standard_error, df = _welch_parts(a, b)
    half_width = t_quantile(0.5 + level / 2.0, df) * standard_error
    return difference, difference - half_width, difference + half_width


def verdict(
    name_a: str,
    a: Sequence[float],
    name_b: str,
    b: Sequence[float],
    higher_is_better: bool = False,
    alpha: float = SIGNIFICANCE,
) -> str:
    """``"A beats B (p = 0.003)"`` where Welch's p < ``alpha`` (A: the better mean; a loss is better lower), else
    ``"no significant difference (p = 0.41)"``."""
    _, _, p = welch_t_test(a, b)
    if p >= alpha:
        return f"no significant difference (p = {p:.2g})"
    a_better = (sum(a) / len(a) > sum(b) / len(b)) == higher_is_better
    winner, loser = (name_a, name_b) if a_better else (name_b, name_a)
    return f"{winner} beats {loser} (p = {p:.2g})"
