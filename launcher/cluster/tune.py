"""``crate tune TUNE.yaml``: the peak learning rate of each architecture searched on a log grid until the best value
is bracketed, that is has a worse neighbour on both sides.

```yaml
name: lm-lr-tune-cpu
output_root: runs/tune/lm-lr-tune-cpu    # a sweep file: runs in <output_root>/<labels>-lr<value>
config: ../lm/crate-tiny.yaml
overrides: {train.max_steps: 400}
axes:                                    # every point of these axes is tuned on its own (each arch, each size)
  arch:
    crate: {model.preset: crate-tiny}
    gpt2: {config: ../lm/gpt2-tiny.yaml}
tune:
  centre: 1.0e-3                         # the first grid: `points` values around it, `factor` apart
  points: 3
  factor: 2
  max_extensions: 4                      # at most this many extensions per architecture (reported if hit)
  scaled: {optimizer.min_lr: 0.1}        # keys set to this multiple of the tuned value (the schedule's floor)
```

Decision: a command of its own rather than a ``tune:`` section that ``crate sweep`` reads, because a sweep is a
fixed grid, validated and submitted as one job array up front, while a tuning's grid grows from its own results.
The file is a sweep file (``launcher.cluster.spec.SweepFile``) plus the ``tune:`` section; ``crate sweep`` refuses
it. Each round is a sweep (``launcher.cluster.sweep``): every run config is validated before it starts, a finished
run is skipped and a partial one resumes, so rerunning ``crate tune`` after an interruption picks up where it
stopped, and ``<output_root>/sweep.json`` lists every run tried (``crate compare OUTPUT_ROOT --best-over lr`` reads
it). After each round the grid of every architecture whose best value sits at an edge grows by one point on that
side (``next_values``, a pure function), until every best is bracketed or its extensions reach the cap.

A run's score is its final eval loss (the eval row at ``train.max_steps``); a run that diverged or failed has none
and counts as worse than any finite loss. Written into ``output_root``: ``tuning.json`` (every value tried, its loss,
the chosen value, whether it is bracketed; rewritten after every round) and ``lr_curves.png`` (loss against the
tuned value per architecture, the chosen point marked). Only the learning rate is tuned for now: β2 and warm-up as
further axes are left for later. The runs go one after another here; there is no Slurm mode.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from data_pipeline.files import atomic_write
from launcher.cluster.spec import SweepFile, expand, grid_key
from launcher.cluster.sweep import (
    Sweep,
    SweepRun,
    build_sweep,
    read_grid_file,
    run_config,
    run_locally,
    write_manifest,
)
from launcher.config.validation import validate
from launcher.errors import ConfigError
from launcher.metrics.logger import read_metrics

SIGNIFICANT_DIGITS = 4  # grid values are rounded so that run names stay short and the same across sessions


class TuneSection(BaseModel):
    """What is tuned and how its grid starts and grows."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    axis: str = "lr"  # the label axis the tuning adds: run names end in <axis><value>
    key: str = "optimizer.lr"
    centre: Annotated[float, Field(gt=0, strict=False)]
    points: Annotated[int, Field(ge=1)] = 3
    factor: Annotated[float, Field(gt=1, strict=False)] = 2.0
    max_extensions: Annotated[int, Field(ge=0)] = 4
    scaled: dict[str, Annotated[float, Field(ge=0, strict=False)]] = {"optimizer.min_lr": 0.1}
    # Replicates of each chosen value once the tuning is done: the tuning's own run is the first seed (its run
    # config's train.seed), these are the others. Every run of the tuning is labelled on ``seed_axis``.
    seeds: list[int] = []
    seed_key: str = "train.seed"
    seed_axis: str = "seed"


class TuneFile(SweepFile):
    """A sweep file with a ``tune:`` section."""

    tune: TuneSection

    @model_validator(mode="after")
    def _tuned_axis_is_new(self):
        if self.tune.axis in self.axes:
            raise ConfigError(f"tune.axis: {self.tune.axis!r} is already an axis of the file; name the tuned axis")
        if self.tune.seeds and self.tune.seed_axis in (*self.axes, self.tune.axis):
            raise ConfigError(f"tune.seed_axis: {self.tune.seed_axis!r} is already an axis; tune.seeds adds it")
        if len(set(self.tune.seeds)) < len(self.tune.seeds):
            raise ConfigError(f"tune.seeds: {self.tune.seeds} repeats a seed")
        return self


# ----------------------------------------------------------------------------------------------------------------------
# The bracketing rule
# ----------------------------------------------------------------------------------------------------------------------


def on_grid(value: float) -> float:
    return float(f"{value:.{SIGNIFICANT_DIGITS}g}")


def first_grid(centre: float, points: int, factor: float) -> list[float]:
    """``points`` values ``factor`` apart around ``centre`` (one more below than above for an even count)."""
    return [on_grid(centre * factor**exponent) for exponent in range(-(points // 2), points - points // 2)]


def score(loss: float | None) -> float:
    """A loss to minimise: a diverged or failed run (NaN, inf, none) is worse than any finite loss."""
    return loss if loss is not None and math.isfinite(loss) else math.inf


def next_values(losses: Mapping[float, float | None], factor: float) -> tuple[float, ...]:
    """The values to try next: one ``factor`` beyond each edge of the grid that holds the lowest loss; ``()`` when
    the best is bracketed (neither edge holds it, so a worse value lies on both sides). Ties count as not worse: a
    flat curve grows on both sides. If every run diverged, the grid grows downwards."""
    values = sorted(losses)
    scores = [score(losses[value]) for value in values]
    best = min(scores)
    if math.isinf(best):
        return (on_grid(values[0] / factor),)
    below = (on_grid(values[0] / factor),) if scores[0] == best else ()
    above = (on_grid(values[-1] * factor),) if scores[-1] == best else ()
    return below + above


# ----------------------------------------------------------------------------------------------------------------------
# The tuning
# ----------------------------------------------------------------------------------------------------------------------


def load_tune_file(path: str | Path) -> tuple[TuneFile, dict]:
    """The checked tuning file and its raw mapping (each round's sweep is built from it)."""
    path = Path(path)
    raw = read_grid_file(path)
    if "tune" not in raw:
        raise ConfigError(f"{path}: tune: missing; a file without it is a sweep (crate sweep)")
    return validate(TuneFile, raw, source=str(path), name=grid_key), raw


def first_grids(spec: TuneFile) -> dict[str, set[float]]:
    """Every point of the file's grid (an architecture, a size, ...) and the first values tried for it."""
    first = first_grid(spec.tune.centre, spec.tune.points, spec.tune.factor)
    return {point.name: set(first) for point in expand(spec)}


def _label(spec: TuneFile, value: float) -> str:
    return f"{spec.tune.axis}{value:g}"


def _group(run: SweepRun, *axes: str) -> str:
    """The run's point of the file's grid: its labels but those of ``axes`` (the tuned one, the seeds)."""
    return "-".join(label for name, label in run.labels.items() if name not in axes) or "all"


def round_sweep(spec: TuneFile, raw: dict, path: Path, grids: Mapping[str, set[float]]) -> Sweep:
    """The sweep of every (group, value) in ``grids``: the file's grid times the tuned axis, its other points left
    out. Every run config is validated (``build_sweep``)."""
    values = sorted(set().union(*grids.values()))
    tuned_axis = {
        _label(spec, value): {
            spec.tune.key: value,
            **{key: on_grid(ratio * value) for key, ratio in spec.tune.scaled.items()},
        }
        for value in values
    }
    sweep_raw = {key: item for key, item in raw.items() if key != "tune"}
    sweep_raw["axes"] = {**raw["axes"], spec.tune.axis: tuned_axis}
    sweep = build_sweep(validate(SweepFile, sweep_raw, source=str(path), name=grid_key), path)
    wanted = {(group, _label(spec, value)) for group, grid in grids.items() for value in grid}
    runs = tuple(run for run in sweep.runs if (_group(run, spec.tune.axis), run.labels[spec.tune.axis]) in wanted)
    for run in runs:
        if not run_config(run).train.eval_every:
            raise ConfigError(f"{path}: run {run.name}: train.eval_every is 0; tuning needs the final eval loss")
    return replace(sweep, runs=runs)


def final_eval_loss(run: SweepRun) -> float | None:
    """The eval loss at the run's last step; None if it has none (it diverged, failed or did not finish)."""
    last_step = run_config(run).train.max_steps
    rows = [row for row in read_metrics(run.output_dir, kind="eval") if row.get("step") == last_step and "loss" in row]
    return rows[-1]["loss"] if rows else None


def _group_record(spec: TuneFile, runs: list[SweepRun], extensions: int) -> dict:
    tried = []
    for run in runs:
        loss = final_eval_loss(run)
        value = float(run.labels[spec.tune.axis][len(spec.tune.axis) :])
        # JSON has no NaN: a non-finite loss is recorded as null, as a missing one
        tried.append({"value": value, "run": run.name, "loss": loss if score(loss) < math.inf else None})
    tried.sort(key=lambda point: point["value"])
    losses = {point["value"]: point["loss"] for point in tried}
    finite = [point for point in tried if point["loss"] is not None]
    chosen = min(finite, key=lambda point: point["loss"]) if finite else None
    bracketed = not next_values(losses, spec.tune.factor)
    return {
        "labels": {name: label for name, label in runs[0].labels.items() if name != spec.tune.axis},
        "tried": tried,
        "chosen": chosen and chosen["value"],
        "chosen_run": chosen and chosen["run"],
        "chosen_loss": chosen and chosen["loss"],
        "bracketed": bracketed,
        "extensions": extensions,
        "cap_reached": not bracketed and extensions >= spec.tune.max_extensions,
    }


def tune(path: str | Path, run_points: Callable[[Sweep], Any] | None = None, log: Callable[[str], Any] = print) -> dict:
    """Tune every point of the file's grid; returns the record (also ``<output_root>/tuning.json``).
    ``run_points(sweep)`` runs a round's sweep, skipping finished runs (default: ``run_locally``)."""
    path = Path(path)
    spec, raw = load_tune_file(path)
    run_points = run_points or run_locally
    grids = first_grids(spec)
    groups = list(grids)
    extensions = dict.fromkeys(groups, 0)
    while True:
        sweep = round_sweep(spec, raw, path, grids)
        write_manifest(sweep)
        run_points(sweep)
        by_group: dict[str, list[SweepRun]] = {}
        for run in sweep.runs:
            by_group.setdefault(_group(run, spec.tune.axis), []).append(run)
        record = {
            "name": spec.name,
            "output_root": spec.output_root,
            "axis": spec.tune.axis,
            "key": spec.tune.key,
            "factor": spec.tune.factor,
            "max_extensions": spec.tune.max_extensions,
            "groups": {group: _group_record(spec, by_group[group], extensions[group]) for group in groups},
        }
        atomic_write(Path(spec.output_root) / "tuning.json", json.dumps(record, indent=1))
        grown = False
        for group, row in record["groups"].items():
            losses = {point["value"]: point["loss"] for point in row["tried"]}
            more = next_values(losses, spec.tune.factor)
            if more and extensions[group] < spec.tune.max_extensions:
                grids[group].update(more)
                extensions[group] += 1
                grown = True
                log(f"tune {group}: best {row['chosen']} at an edge of the grid; adding {', '.join(map(str, more))}")
        if not grown:
            break
    if spec.tune.seeds:
        record = _run_seeds(spec, raw, path, sweep, record, run_points, log)
    save_tuning_curves(record, Path(spec.output_root) / "lr_curves.png")
    for group, row in record["groups"].items():
        state = "bracketed" if row["bracketed"] else f"NOT bracketed (cap of {spec.tune.max_extensions} extensions)"
        log(f"tune {group}: chosen {spec.tune.key}={row['chosen']} (eval loss {row['chosen_loss']}), {state}")
    return record


def seed_sweep(spec: TuneFile, raw: dict, path: Path, tuned: Sweep, record: dict) -> tuple[Sweep, tuple, int]:
    """The seed replicates of every group's chosen value (``tune.seeds`` other than the tuning's own seed), as
    (the sweep of every run, the replicates, the tuning's seed). In the sweep every tuning run is labelled with the
    tuning's seed, so that ``crate compare --best-over lr`` scores each candidate on the seed they all share and
    keeps every seed of the chosen one."""
    base_seeds = {run_config(run).train.seed for run in tuned.runs}
    if len(base_seeds) > 1:
        raise ConfigError(f"{path}: tune.seeds: the tuning's runs have different {spec.tune.seed_key}s {base_seeds}")
    (base,) = base_seeds
    axis = spec.tune.seed_axis
    seeds = [seed for seed in spec.tune.seeds if seed != base]
    chosen = {group: row["chosen"] for group, row in record["groups"].items() if row["chosen"] is not None}
    values = sorted(set(chosen.values()))
    sweep_raw = {key: item for key, item in raw.items() if key != "tune"}
    sweep_raw["axes"] = {
        **raw["axes"],
        spec.tune.axis: {
            _label(spec, value): {
                spec.tune.key: value,
                **{key: on_grid(ratio * value) for key, ratio in spec.tune.scaled.items()},
            }
            for value in values
        },
        axis: {spec.tune.seed_key: seeds},
    }
    replicates = build_sweep(validate(SweepFile, sweep_raw, source=str(path), name=grid_key), path)
    wanted = {(group, _label(spec, value)) for group, value in chosen.items()}
    runs = tuple(
        run for run in replicates.runs if (_group(run, spec.tune.axis, axis), run.labels[spec.tune.axis]) in wanted
    )
    labelled = tuple(replace(run, labels={**run.labels, axis: f"{axis}{base}"}) for run in tuned.runs)
    return replace(tuned, runs=labelled + runs), runs, base


def _run_seeds(spec, raw, path, tuned: Sweep, record: dict, run_points, log) -> dict:
    """Run the seed replicates, add them to ``sweep.json`` and each group's record (``seeds``: every seed's run and
    final eval loss, the tuning's own first)."""
    sweep, runs, base = seed_sweep(spec, raw, path, tuned, record)
    write_manifest(sweep)
    log(f"tune: {len(runs)} seed replicates of the chosen values (seeds {spec.tune.seeds}; the tuning's is {base})")
    run_points(replace(sweep, runs=runs))
    for group, row in record["groups"].items():
        if row["chosen"] is None:
            continue
        members = [run for run in runs if _group(run, spec.tune.axis, spec.tune.seed_axis) == group]
        row["seeds"] = [{"seed": base, "run": row["chosen_run"], "loss": row["chosen_loss"]}] + [
            {
                "seed": int(run.labels[spec.tune.seed_axis][len(spec.tune.seed_axis) :]),
                "run": run.name,
                "loss": final_eval_loss(run),
            }
            for run in members
        ]
    atomic_write(Path(spec.output_root) / "tuning.json", json.dumps(record, indent=1))
    return record


def save_tuning_curves(record: dict, path: Path) -> Path:
    """Final eval loss against the tuned value, one panel per group, log x; the chosen point starred, runs without
    a finite loss crossed at the top."""
    from launcher.metrics.figures import pyplot, save_and_close

    plt = pyplot()
    groups = record["groups"]
    figure, axes = plt.subplots(1, len(groups), figsize=(4 * len(groups), 3.4), squeeze=False)
    for axis, (group, row) in zip(axes[0], groups.items()):
        finite = [(point["value"], point["loss"]) for point in row["tried"] if point["loss"] is not None]
        failed = [point["value"] for point in row["tried"] if point["loss"] is None]
        if finite:
            axis.plot(*zip(*finite), marker="o", markersize=4)
        if failed:
            top = max((loss for _, loss in finite), default=1.0)
            axis.scatter(failed, [top] * len(failed), marker="x", color="red", label="diverged / no eval")
            axis.legend(fontsize=7)
        if row["chosen"] is not None:
            axis.scatter([row["chosen"]], [row["chosen_loss"]], marker="*", s=160, color="C3", zorder=3)
        axis.set_xscale("log", base=2)
        axis.set_xlabel(record["key"])
        axis.set_ylabel("final eval loss")
        axis.set_title(f"{group}: {row['chosen']:g}" if row["chosen"] is not None else group, fontsize=9)
        if not row["bracketed"]:
            axis.set_title(axis.get_title() + " (not bracketed)", fontsize=9)
        axis.grid(alpha=0.3, which="both")
    return save_and_close(figure, path)
