"""The power-law fits of the scaling reports recover known laws from synthetic points."""

from __future__ import annotations

import numpy as np
import pytest

from launcher.analysis.scaling import fit_power_law


def test_pure_power_law_is_recovered_exactly():
    x = np.array([1e5, 3e5, 1e6, 3e6, 1e7])
    law = fit_power_law(x, 7.0 * x**-0.076)  # Kaplan et al.'s parameter exponent
    assert law.exponent == pytest.approx(0.076, rel=1e-9) and law.coefficient == pytest.approx(7.0, rel=1e-9)
    assert law.offset == 0 and law.r2 == pytest.approx(1.0)
    np.testing.assert_allclose(law(x), 7.0 * x**-0.076)


def test_irreducible_loss_and_exponent_are_recovered_with_an_offset():
    x = np.geomspace(1e6, 1e9, 6)
    law = fit_power_law(x, 1.69 + 406.4 * x**-0.34, with_offset=True)  # Chinchilla's parameter term
    assert law.offset == pytest.approx(1.69, abs=0.01)
    assert law.exponent == pytest.approx(0.34, abs=0.01)


def test_noisy_points_give_a_close_exponent():
    rng = np.random.default_rng(0)
    x = np.geomspace(1e6, 1e8, 8)
    law = fit_power_law(x, 3.0 * x**-0.1 * np.exp(rng.normal(0, 0.005, len(x))))
    assert law.exponent == pytest.approx(0.1, abs=0.01) and law.r2 > 0.95


@pytest.mark.parametrize(
    "x, y, offset, message",
    [
        ([1, 2], [3, 2], False, "at least 3"),
        ([1, 2, 3], [3, 2, 1], True, "at least 4"),
        ([1, 2, 0], [3, 2, 1], False, "positive"),
        ([2, 2, 2], [3, 2, 1], False, "two distinct"),
        ([1, 2, 3], [3, 2, 1], False, "spanning at least 4x"),
    ],
)
def test_bad_points_are_refused(x, y, offset, message):
    with pytest.raises(ValueError, match=message):
        fit_power_law(x, y, with_offset=offset)


def test_description_writes_the_exponent_with_its_sign_error_and_span():
    x = np.array([1.0, 10.0, 100.0])
    assert "·N^-0.100 ± 0.000 (R² 1.000, 3 pts spanning 100x)" in fit_power_law(x, 2.0 * x**-0.1).describe()
    assert "·N^+0.050 " in fit_power_law(x, 2.0 * x**0.05).describe()  # a loss that rises with size


def test_the_exponents_standard_error_is_the_regressions():
    """Known values: log y = 0, 1, 0 at log x = 0, 1, 2 (slope 0); residuals -1/3, 2/3, -1/3 -> SSE 2/3 on
    1 degree of freedom, Sxx 2: se = sqrt(2/3 / 1 / 2) = 0.5774."""
    x = np.exp([0.0, 1.0, 2.0])
    law = fit_power_law(x, np.exp([0.0, 1.0, 0.0]))
    assert law.exponent == pytest.approx(0.0, abs=1e-12)
    assert law.exponent_stderr == pytest.approx(np.sqrt(1 / 3), rel=1e-9)
