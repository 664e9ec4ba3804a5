"""The seed statistics on known inputs: Student's t CDF against its closed forms (df 1 and 2) and the normal limit,
Welch's t, df and p against the formulas computed here and a published example, the confidence interval, and the
verdict's wording."""

from __future__ import annotations

import math

import pytest

from launcher.analysis.statistics import difference_ci, mean_std, t_cdf, t_quantile, verdict, welch_t_test


def cauchy_cdf(t: float) -> float:  # Student's t with 1 degree of freedom
    return 0.5 + math.atan(t) / math.pi


def t2_cdf(t: float) -> float:  # Student's t with 2 degrees of freedom
    return 0.5 + t / (2.0 * math.sqrt(2.0 + t * t))


def normal_cdf(t: float) -> float:
    return 0.5 * (1.0 + math.erf(t / math.sqrt(2.0)))


@pytest.mark.parametrize("t", [-30.0, -4.0, -1.0, -0.3, 0.0, 0.5, 2.0, 12.706])
def test_the_t_cdf_matches_its_closed_forms_for_one_and_two_degrees_of_freedom(t):
    assert t_cdf(t, 1) == pytest.approx(cauchy_cdf(t), abs=1e-12)
    assert t_cdf(t, 2) == pytest.approx(t2_cdf(t), abs=1e-12)


@pytest.mark.parametrize("t", [-2.5, -1.0, 0.0, 1.2, 1.959964, 3.0])
def test_the_t_cdf_tends_to_the_normal_for_many_degrees_of_freedom(t):
    assert t_cdf(t, 1e7) == pytest.approx(normal_cdf(t), abs=1e-6)


def test_the_t_quantiles_are_the_tables_values():
    # df 2 inverted by hand: u = 2q - 1, t = u sqrt(2 / (1 - u^2)); df 1: tan(pi (q - 1/2))
    assert t_quantile(0.975, 2) == pytest.approx(0.95 * math.sqrt(2 / (1 - 0.95**2)), rel=1e-10)
    assert t_quantile(0.975, 1) == pytest.approx(math.tan(math.pi * 0.475), rel=1e-10)
    assert t_quantile(0.975, 10) == pytest.approx(2.228139, abs=1e-6)  # the printed table
    assert t_quantile(0.975, 1e7) == pytest.approx(1.959964, abs=1e-5)
    assert t_quantile(0.025, 5) == pytest.approx(-t_quantile(0.975, 5))


def test_mean_and_sample_std():
    mean, std = mean_std([2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0])
    assert mean == 5.0 and std == pytest.approx(math.sqrt(32 / 7))
    assert mean_std([3.0]) == (3.0, None)


def test_welch_with_two_degrees_of_freedom_against_the_closed_form():
    # equal variances (2) and sizes (2): v_a = v_b = 1, t = (2 - 5) / sqrt(2), df = (1 + 1)^2 / (1 + 1) = 2
    t, df, p = welch_t_test([1.0, 3.0], [4.0, 6.0])
    assert t == pytest.approx(-3 / math.sqrt(2)) and df == pytest.approx(2.0)
    assert p == pytest.approx(2 * t2_cdf(-3 / math.sqrt(2)), abs=1e-12)  # 0.16795
    # one sample without spread: df = n_a - 1 = 2; t = (2 - 5) / sqrt(1/3)
    t, df, p = welch_t_test([1.0, 2.0, 3.0], [5.0, 5.0, 5.0])
    assert t == pytest.approx(-3 * math.sqrt(3)) and df == pytest.approx(2.0)
    assert p == pytest.approx(2 * t2_cdf(-3 * math.sqrt(3)), abs=1e-12)  # 0.0351


def test_welch_with_one_degree_of_freedom_against_the_closed_form():
    t, df, p = welch_t_test([0.0, 2.0], [5.0, 5.0, 5.0])  # v_a = 1, v_b = 0: t = -4, df = n_a - 1 = 1
    assert t == pytest.approx(-4.0) and df == pytest.approx(1.0)
    assert p == pytest.approx(2 * cauchy_cdf(-4.0), abs=1e-12)  # 0.15596


def test_welch_on_the_published_example():
    # Wikipedia, "Welch's t-test", example 2: t = -2.46, df = 25.0, p = 0.021
    a = [27.5, 21.0, 19.0, 23.6, 17.0, 17.9, 16.9, 20.1, 21.9, 22.6, 23.1, 19.6, 19.0, 21.7, 21.4]
    b = [27.1, 22.0, 20.8, 23.4, 23.4, 23.5, 25.8, 22.0, 24.8, 20.2, 21.9, 22.1, 22.9, 20.5, 24.4]
    t, df, p = welch_t_test(a, b)
    (mean_a, std_a), (mean_b, std_b) = mean_std(a), mean_std(b)
    v_a, v_b = std_a**2 / len(a), std_b**2 / len(b)
    assert t == pytest.approx((mean_a - mean_b) / math.sqrt(v_a + v_b))
    assert df == pytest.approx((v_a + v_b) ** 2 / (v_a**2 / 14 + v_b**2 / 14))
    assert round(t, 2) == -2.46 and round(df, 1) == 25.0 and round(p, 3) == 0.021
    assert welch_t_test(b, a) == pytest.approx((-t, df, p))


def test_samples_without_spread():
    assert welch_t_test([1.0, 1.0], [1.0, 1.0]) == (0.0, 2.0, 1.0)
    t, _, p = welch_t_test([1.0, 1.0], [2.0, 2.0])
    assert t == -math.inf and p == 0.0
    with pytest.raises(ValueError, match="2 or more values per sample"):
        welch_t_test([1.0], [1.0, 2.0])


def test_the_confidence_interval_of_the_difference():
    difference, low, high = difference_ci([1.0, 3.0], [4.0, 6.0])  # df 2: half-width 4.3027 * sqrt(2)
    half_width = 0.95 * math.sqrt(2 / (1 - 0.95**2)) * math.sqrt(2)
    assert difference == -3.0 and (low, high) == pytest.approx((-3.0 - half_width, -3.0 + half_width))
    _, low90, high90 = difference_ci([1.0, 3.0], [4.0, 6.0], level=0.90)
    assert low < low90 < high90 < high
    # the 95% interval excludes 0 exactly when the two-sided p is below 0.05
    a, b = [1.0, 1.1, 1.05], [1.2, 1.25, 1.3]
    _, low, high = difference_ci(a, b)
    assert (high < 0) == (welch_t_test(a, b)[2] < 0.05)


def test_the_verdict_names_the_better_mean_only_when_significant():
    low, high = [2.00, 2.01, 2.02], [2.30, 2.31, 2.33]
    p = welch_t_test(low, high)[2]
    assert verdict("crate", low, "gpt2", high) == f"crate beats gpt2 (p = {p:.2g})"
    assert verdict("gpt2", high, "crate", low) == f"crate beats gpt2 (p = {p:.2g})"
    assert verdict("crate", low, "gpt2", high, higher_is_better=True) == f"gpt2 beats crate (p = {p:.2g})"
    noisy_a, noisy_b = [2.0, 2.5, 1.8], [2.1, 2.6, 1.9]
    p = welch_t_test(noisy_a, noisy_b)[2]
    assert p > 0.05 and verdict("crate", noisy_a, "gpt2", noisy_b) == f"no significant difference (p = {p:.2g})"
