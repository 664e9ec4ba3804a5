"""Compute-matched comparison: Chinchilla's approach 2 (IsoFLOP profiles, Hoffmann et al. 2022).

At each training-FLOP budget ``C`` several sizes ``N`` of an architecture are trained for ``C`` FLOPs each
(``train.flops_budget`` in a sweep, ``launcher.cluster.budget``). Per architecture and budget the final eval loss is
fitted by a parabola in ``log N``, ``L = a (log N)^2 + b log N + c``; its vertex ``N* = exp(-b / 2a)`` is the
compute-optimal size at that budget and ``L* = L(N*)`` the loss it reaches. Comparing ``L*`` between architectures at
the same budget says which is better *at equal compute*; ``N*`` across budgets says how the optimum size moves.

Decisions:
- ``N`` is non-embedding parameters (what ``crate compare`` plots against elsewhere; Kaplan et al.). The FLOPs are
  the registry's count, attention and LM head included (Porian et al. 2024).
- Seed replicates of one (architecture, size, budget) are averaged before the fit.
- Three sizes determine the parabola exactly: it is drawn and its vertex reported, but with no error estimate. Four
  or more give the residual standard deviation and, by the delta method from the fit's covariance, a standard error
  of ``log N*``.
- A parabola that opens downwards (``a <= 0``) has no minimum: the profile reports the best size measured and says so.
  A vertex outside the sizes measured is reported as extrapolated.
- A profile is *bracketed* when its best measured size has a measured size on both sides (the rule the learning-rate
  tuning follows). An unbracketed profile says which way to grow the grid; at equal compute it is ranked by its best
  measured loss (an upper bound on its L*, and marked so), not by an extrapolated vertex, and it is left out of the
  scaling of ``N*``.
- ``N*`` against ``C`` as a power law only with 3 or more bracketed budgets spanning at least 4x, with the exponent's
  standard error; with 2, the ratio of the optima and the exponent the end points imply, called what it is.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

MIN_SIZES = 3
MIN_BUDGETS_FOR_A_LAW = 3
MIN_BUDGET_SPAN = 4.0


@dataclass(frozen=True)
class Profile:
    """One architecture at one budget."""

    family: str
    budget: str  # the sweep label
    flops: float  # mean training FLOPs of its runs
    sizes: list[float]  # non-embedding parameters, ascending
    losses: list[float]  # mean final eval loss per size
    seeds: list[int]  # runs averaged per size
    curvature: float | None = None  # a, of the parabola in ln N
    optimum_params: float | None = None  # N*
    optimum_loss: float | None = None  # L*
    log_optimum_stderr: float | None = None  # standard error of ln N* (4+ sizes)
    residual_std: float | None = None  # of the fit (4+ sizes)
    note: str = ""  # "exact fit (3 sizes)", "extrapolated", "no minimum: best measured", "not bracketed"
    bracketed: bool = False  # the best measured size has a measured size on each side

    @property
    def best_measured_loss(self) -> float:
        return min(self.losses)


def fit_profile(family: str, budget: str, flops: float, points: dict[float, list[float]]) -> Profile:
    """The IsoFLOP profile of ``points`` (size -> final losses of its seeds)."""
    sizes = sorted(points)
    losses = [sum(points[n]) / len(points[n]) for n in sizes]
    seeds = [len(points[n]) for n in sizes]
    best = int(np.argmin(losses))
    bracketed = 0 < best < len(sizes) - 1
    profile = Profile(family, budget, flops, sizes, losses, seeds, bracketed=bracketed)
    if len(sizes) < MIN_SIZES:
        return _replace(profile, note=f"{len(sizes)} sizes: a parabola needs {MIN_SIZES}")
    side = "smallest" if best == 0 else "largest"
    edge = [] if bracketed else [f"not bracketed: the {side} size is the best measured"]
    x, y = np.log(np.asarray(sizes)), np.asarray(losses)
    if len(sizes) > MIN_SIZES:
        coefficients, covariance = np.polyfit(x, y, 2, cov=True)
    else:
        coefficients, covariance = np.polyfit(x, y, 2), None
    a, b, c = (float(v) for v in coefficients)
    if a <= 0:
        return _replace(
            profile,
            curvature=a,
            optimum_params=sizes[best],
            optimum_loss=losses[best],
            note="; ".join(["no minimum (the parabola opens downwards): the best size measured", *edge]),
        )
    vertex = -b / (2 * a)
    notes = list(edge)
    if covariance is None:
        notes.append(f"exact fit ({MIN_SIZES} sizes): no error estimate")
        residual_std = log_stderr = None
    else:
        residual = y - np.polyval(coefficients, x)
        residual_std = float(math.sqrt(residual @ residual / (len(x) - 3)))
        # delta method on x* = -b / 2a: gradient (b / 2a², -1 / 2a, 0)
        gradient = np.array([b / (2 * a * a), -1 / (2 * a), 0.0])
        log_stderr = float(math.sqrt(max(0.0, gradient @ covariance @ gradient)))
    if not x.min() <= vertex <= x.max():
        notes.append("extrapolated: the minimum lies outside the sizes measured")
    return _replace(
        profile,
        curvature=a,
        optimum_params=float(math.exp(vertex)),
        optimum_loss=float(a * vertex * vertex + b * vertex + c),
        log_optimum_stderr=log_stderr,
        residual_std=residual_std,
        note="; ".join(notes),
    )


def _replace(profile: Profile, **changes) -> Profile:
    return Profile(**{**asdict(profile), **changes})


@dataclass(frozen=True)
class OptimumScaling:
    """How one architecture's optimum size moves with compute: ``N* = k C^exponent``."""

    family: str
    budgets: int
    span: float  # largest budget / smallest
    exponent: float | None
    exponent_stderr: float | None
    description: str


def optimum_scaling(profiles: list[Profile]) -> OptimumScaling | None:
    """A power law of ``N*`` against ``C`` over one family's bracketed profiles; None with fewer than 2 profiles
    that have an optimum at all."""
    fitted = [p for p in profiles if p.optimum_params and "no minimum" not in p.note]
    if len(fitted) < 2:
        return None
    usable = sorted((p for p in fitted if p.bracketed), key=lambda p: p.flops)
    family = fitted[0].family
    if len(usable) < 2:
        return OptimumScaling(
            family,
            len(usable),
            1.0,
            None,
            None,
            f"{family}: N* is bracketed at {len(usable)} of {len(fitted)} budgets: no scaling of the optimum "
            "(the best size sits at the edge of the grid; measure beyond it)",
        )
    left_out = len(fitted) - len(usable)
    aside = f"; {left_out} budget{'s' if left_out > 1 else ''} left out, not bracketed" if left_out else ""
    c = np.log([p.flops for p in usable])
    n = np.log([p.optimum_params for p in usable])
    span = float(math.exp(c[-1] - c[0]))
    if len(usable) < MIN_BUDGETS_FOR_A_LAW or span < MIN_BUDGET_SPAN:
        exponent = float((n[-1] - n[0]) / (c[-1] - c[0])) if c[-1] > c[0] else None
        ratio = math.exp(n[-1] - n[0])
        implied = f"{exponent:.2f}" if exponent is not None else "undefined"
        return OptimumScaling(
            family,
            len(usable),
            span,
            exponent,
            None,
            f"{family}: N* moves {ratio:.2f}x over a {span:.2f}x compute range (from {len(usable)} budgets: the "
            f"exponent the end points imply, {implied}, is not a fit; a power law needs "
            f"{MIN_BUDGETS_FOR_A_LAW} budgets spanning {MIN_BUDGET_SPAN:g}x{aside})",
        )
    (slope, _), covariance = np.polyfit(c, n, 1, cov=True) if len(usable) > 2 else (np.polyfit(c, n, 1), None)
    stderr = float(math.sqrt(covariance[0, 0])) if covariance is not None else None
    error = f" ± {stderr:.2f}" if stderr is not None else " (exact: no error estimate)"
    return OptimumScaling(
        family,
        len(usable),
        span,
        float(slope),
        stderr,
        f"{family}: N* ∝ C^{slope:.2f}{error} over {len(usable)} budgets spanning {span:.1f}x{aside}",
    )


def isoflop_profiles(runs, budget_axis: str = "budget", seed_axis: str = "seed") -> list[Profile]:
    """Every (family, budget) profile of the runs labelled on ``budget_axis`` that have an eval loss and a size."""
    groups: dict[tuple[str, str], dict[float, list[float]]] = {}
    flops: dict[tuple[str, str], list[float]] = {}
    for run in runs:
        budget = run.labels.get(budget_axis)
        loss = run.eval.get("loss")
        if budget is None or loss is None or not run.non_embedding_params:
            continue
        key = (run.family, budget)
        groups.setdefault(key, {}).setdefault(float(run.non_embedding_params), []).append(loss)
        if run.flops:
            flops.setdefault(key, []).append(run.flops)
    return [
        fit_profile(
            family, budget, sum(flops.get((family, budget), [0.0])) / len(flops.get((family, budget), [1])), points
        )
        for (family, budget), points in sorted(
            groups.items(), key=lambda item: (item[0][0], _mean_flops(flops, item[0]))
        )
    ]


def _mean_flops(flops: dict, key) -> float:
    values = flops.get(key, [])
    return sum(values) / len(values) if values else 0.0


def compute_matched_loss(profile: Profile) -> float:
    """The loss a profile is ranked by at equal compute: its fitted L* when bracketed, else its best measured loss
    (an upper bound on L*; an extrapolated vertex is not evidence)."""
    if profile.bracketed and profile.optimum_loss is not None:
        return profile.optimum_loss
    return profile.best_measured_loss


def equal_compute_verdicts(profiles: list[Profile]) -> list[dict]:
    """Per budget, each family's compute-matched loss ([`compute_matched_loss`]), best first, and the gap of each to
    the best; ``bound`` marks an unbracketed profile's best measured loss."""
    rows = []
    budgets = sorted({p.budget for p in profiles}, key=lambda b: min(p.flops for p in profiles if p.budget == b))
    for budget in budgets:
        members = sorted(
            (p for p in profiles if p.budget == budget and p.optimum_loss is not None), key=compute_matched_loss
        )
        if not members:
            continue
        best = compute_matched_loss(members[0])
        rows.append(
            {
                "budget": budget,
                "flops": members[0].flops,
                "ranking": [
                    {
                        "family": p.family,
                        "optimum_loss": compute_matched_loss(p),
                        "optimum_params": p.optimum_params if p.bracketed else p.sizes[p.losses.index(min(p.losses))],
                        "gap": compute_matched_loss(p) - best,
                        "bound": not p.bracketed,
                        "note": p.note,
                    }
                    for p in members
                ],
            }
        )
    return rows


def save_isoflop_figure(profiles: list[Profile], path) -> object:
    """Loss against non-embedding parameters, one colour per family and one marker per budget, each profile's
    parabola and, where bracketed, its minimum (a star)."""
    from launcher.metrics.figures import pyplot, save_and_close

    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6, 4.2))
    families = list(dict.fromkeys(p.family for p in profiles))
    budgets = list(dict.fromkeys(p.budget for p in sorted(profiles, key=lambda p: p.flops)))
    markers = "osD^vP*X"
    for profile in profiles:
        colour = f"C{families.index(profile.family) % 10}"
        marker = markers[budgets.index(profile.budget) % len(markers)]
        axis.scatter(
            profile.sizes,
            profile.losses,
            color=colour,
            marker=marker,
            s=22,
            label=f"{profile.family}, {profile.budget} ({profile.flops:.2g} FLOPs)",
        )
        if profile.curvature is not None and profile.curvature > 0 and len(profile.sizes) >= MIN_SIZES:
            x = np.log(np.asarray(profile.sizes))
            coefficients = np.polyfit(x, np.asarray(profile.losses), 2)
            low, high = x.min() - 0.15, x.max() + 0.15
            grid = np.linspace(low, high, 60)
            axis.plot(
                np.exp(grid),
                np.polyval(coefficients, grid),
                color=colour,
                linewidth=1,
                linestyle=("-", "--", ":", "-.")[budgets.index(profile.budget) % 4],
            )
        if profile.optimum_params is not None and profile.bracketed:
            axis.scatter(
                [profile.optimum_params],
                [profile.optimum_loss],
                color=colour,
                marker="*",
                s=120,
                edgecolor="black",
                linewidth=0.5,
                zorder=3,
            )
    axis.set_xscale("log")
    axis.set_xlabel("non-embedding parameters")
    axis.set_ylabel("final eval loss")
    axis.set_title("IsoFLOP profiles: the star is each bracketed parabola's minimum", fontsize=9)
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=6)
    return save_and_close(figure, path)
