"""IsoFLOP profiles (Chinchilla's approach 2) on synthetic losses with a known optimum: the parabola's vertex, the
exact 3-size fit, the error of a 4+-size fit, a profile without a minimum, an extrapolated one, how the optimum
moves with compute (a power law only from 3 budgets spanning 4x), the equal-compute ranking and the report."""

from __future__ import annotations

import json
import math

import pytest

from launcher.analysis.compare import RunSummary, write_report
from launcher.analysis.isoflop import (
    equal_compute_verdicts,
    fit_profile,
    isoflop_profiles,
    optimum_scaling,
)


def bowl(optimum: float, floor: float, curvature: float = 0.2):
    """A loss exactly quadratic in ln N with its minimum ``floor`` at ``optimum``."""
    return lambda n: floor + curvature * math.log(n / optimum) ** 2


def test_the_vertex_of_an_exact_parabola_is_the_optimum():
    curve = bowl(3e5, 4.0)
    sizes = [1e5, 2e5, 4e5, 8e5]
    profile = fit_profile("crate", "c1", 1e13, {n: [curve(n)] for n in sizes})
    assert profile.optimum_params == pytest.approx(3e5, rel=1e-6)
    assert profile.optimum_loss == pytest.approx(4.0, abs=1e-9)
    assert profile.curvature == pytest.approx(0.2, rel=1e-6)
    assert profile.residual_std == pytest.approx(0.0, abs=1e-6) and profile.note == ""


def test_three_sizes_fit_exactly_and_say_there_is_no_error_estimate():
    curve = bowl(2e5, 4.0)
    profile = fit_profile("gpt2", "c1", 1e13, {n: [curve(n)] for n in (1e5, 2e5, 4e5)})
    assert profile.optimum_params == pytest.approx(2e5, rel=1e-6)
    assert profile.log_optimum_stderr is None and "exact fit (3 sizes): no error estimate" in profile.note


def test_noisy_points_give_an_error_and_seeds_are_averaged():
    curve = bowl(2e5, 4.0)
    noise = [0.01, -0.012, 0.008, -0.006, 0.011]
    sizes = [5e4, 1e5, 2e5, 4e5, 8e5]
    points = {n: [curve(n) + e - 0.002, curve(n) + e + 0.002] for n, e in zip(sizes, noise)}
    profile = fit_profile("crate", "c1", 1e13, points)
    assert profile.losses == pytest.approx([curve(n) + e for n, e in zip(sizes, noise)])
    assert profile.seeds == [2] * 5
    assert profile.residual_std > 0 and 0 < profile.log_optimum_stderr < 0.5
    assert abs(math.log(profile.optimum_params / 2e5)) < 3 * profile.log_optimum_stderr


def test_a_profile_without_a_minimum_reports_the_best_size_measured():
    profile = fit_profile("crate", "c1", 1e13, {1e5: [4.0], 2e5: [3.8], 4e5: [3.9], 8e5: [4.6]})
    assert profile.optimum_params is not None  # a real minimum here
    falling = fit_profile("crate", "c1", 1e13, {1e5: [4.0], 2e5: [3.9], 4e5: [3.5]})  # concave: opens downwards
    assert falling.curvature < 0 and falling.optimum_params == 4e5 and falling.optimum_loss == 3.5
    assert "no minimum" in falling.note


def test_a_minimum_outside_the_sizes_measured_is_called_extrapolated():
    curve = bowl(2e6, 4.0)
    profile = fit_profile("crate", "c1", 1e13, {n: [curve(n)] for n in (1e5, 2e5, 4e5, 8e5)})
    assert profile.optimum_params == pytest.approx(2e6, rel=1e-4) and "extrapolated" in profile.note


def test_an_unbracketed_profile_is_ranked_by_its_best_measured_loss_and_left_out_of_the_scaling():
    curve = bowl(3e4, 4.0)  # the optimum below every size measured
    edge = fit_profile("crate", "c1", 1e12, {n: [curve(n)] for n in (1e5, 2e5, 4e5, 8e5)})
    assert not edge.bracketed and "not bracketed: the smallest size is the best measured" in edge.note
    assert edge.optimum_params == pytest.approx(3e4, rel=1e-4)  # the vertex, extrapolated, is still reported
    inside = fit_profile("llama", "c1", 1e12, {n: [bowl(2e5, 4.2)(n)] for n in (1e5, 2e5, 4e5, 8e5)})
    (row,) = equal_compute_verdicts([edge, inside])
    # crate's vertex (4.0) would win; its best measured loss, curve(1e5) = 4.24, is what it has shown
    assert [(r["family"], r["bound"]) for r in row["ranking"]] == [("llama", False), ("crate", True)]
    assert row["ranking"][1]["optimum_loss"] == pytest.approx(curve(1e5)) and row["ranking"][1]["optimum_params"] == 1e5
    later = profiles_at({4e12: 1e5, 1.6e13: 2e5})
    scaling = optimum_scaling([edge, *later])
    assert "1 budget left out, not bracketed" in scaling.description and scaling.budgets == 2
    alone = optimum_scaling([edge, *later[:1]])
    assert alone.exponent is None and "bracketed at 1 of 2 budgets" in alone.description


def test_too_few_sizes_give_no_fit():
    profile = fit_profile("crate", "c1", 1e13, {1e5: [4.0], 2e5: [3.9]})
    assert profile.optimum_params is None and "a parabola needs 3" in profile.note


def profiles_at(budgets: dict[float, float], family: str = "crate") -> list:
    """Exact profiles whose optimum is ``budgets[C]`` at each budget C."""
    return [
        fit_profile(family, f"c{flops:.0e}", flops, {n: [bowl(optimum, 4.0)(n)] for n in (3e4, 1e5, 3e5, 1e6, 3e6)})
        for flops, optimum in budgets.items()
    ]


def test_the_optimum_scales_as_a_power_law_only_with_three_budgets_over_four_x():
    exponent = 0.5
    law = {flops: 1e5 * (flops / 1e12) ** exponent for flops in (1e12, 4e12, 1.6e13)}
    scaling = optimum_scaling(profiles_at(law))
    assert scaling.exponent == pytest.approx(0.5, abs=1e-6) and scaling.exponent_stderr == pytest.approx(0, abs=1e-6)
    assert scaling.span == pytest.approx(16) and "N* ∝ C^0.50" in scaling.description
    two = optimum_scaling(profiles_at({1e12: 1e5, 4e12: 2e5}))
    assert two.exponent == pytest.approx(0.5) and two.exponent_stderr is None
    assert "moves 2.00x over a 4.00x compute range" in two.description and "not a fit" in two.description
    narrow = optimum_scaling(profiles_at({1e12: 1e5, 1.5e12: 1.2e5, 2e12: 1.4e5}))  # 3 budgets but only 2x apart
    assert "not a fit" in narrow.description
    assert optimum_scaling(profiles_at({1e12: 1e5})) is None


def test_equal_compute_ranks_the_families_by_their_fitted_optimum():
    profiles = profiles_at({1e12: 2e5}, "crate") + [
        fit_profile("gpt2", "c1e+12", 1e12, {n: [bowl(4e5, 3.9)(n)] for n in (1e5, 3e5, 1e6)})
    ]
    (row,) = equal_compute_verdicts(profiles)
    assert [r["family"] for r in row["ranking"]] == ["gpt2", "crate"]
    assert row["ranking"][1]["gap"] == pytest.approx(0.1, abs=1e-9)


def run(name: str, family: str, size: int, budget: str, flops: float, loss: float, seed: str | None = None):
    labels = {"arch": family, "size": name, "budget": budget, **({"seed": seed} if seed else {})}
    summary = RunSummary(
        name=f"{family}-{name}-{budget}", path=None, family=family, model_type=family, task="causal-lm"
    )
    summary.non_embedding_params, summary.flops, summary.tokens = size, flops, flops / (6 * size)
    summary.eval, summary.labels = {"loss": loss}, labels
    return summary


def test_the_report_has_the_compute_matched_section_figure_and_json(tmp_path):
    runs = []
    for family, optimum, floor in (("crate", 2e5, 4.1), ("llama", 3e5, 3.9)):
        for budget, flops, shift in (("c1", 1e13, 0.0), ("c4", 4e13, -0.2)):
            for name, size in (("s", 100_000), ("m", 300_000), ("l", 900_000), ("xl", 2_700_000)):
                runs.append(
                    run(name, family, size, budget, flops, bowl(optimum * (1 + 3 * (shift != 0)), floor + shift)(size))
                )
    assert len(isoflop_profiles(runs)) == 4
    report = write_report(runs, tmp_path / "report")
    text = report.read_text()
    assert "## Compute-matched: IsoFLOP profiles" in text
    assert "- c1 (1e+13 FLOPs): llama 3.9000, then crate 4.1000 (+0.2000)" in text
    assert "crate: N* moves 4.00x over a 4.00x compute range" in text
    saved = json.loads((tmp_path / "report" / "isoflop.json").read_text())
    assert [p["optimum_params"] for p in saved["profiles"]] == pytest.approx([2e5, 8e5, 3e5, 1.2e6], rel=1e-4)
    assert (tmp_path / "report" / "isoflop.png").stat().st_size > 10_000
