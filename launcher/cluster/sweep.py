"""``crate sweep SWEEP.yaml``: a grid of runs (architecture x size x seed x ...) expanded into run configs, run one
after another here, or submitted to Slurm as one job array.

```yaml
name: lm-scaling-cpu
output_root: runs/sweeps/lm-scaling-cpu   # each run in <output_root>/<run name>
command: pretrain                         # or finetune
config: ../lm/crate-tiny.yaml             # the run config every point starts from (relative to this file)
overrides: {train.max_steps: 300}         # applied to every run
axes:                                     # the cartesian product, in this order (the run name joins the labels)
  arch:                                   # labelled points: label -> overrides; `config` swaps the run config
    crate: {model.preset: crate-tiny}
    gpt2: {config: ../lm/gpt2-tiny.yaml}
  size:                                   # `when`: extra overrides for runs that also carry another axis's label
    s: {model.hidden_size: 64, when: {gpt2: {model.hidden_size: 32}}}    # e.g. matching parameter counts
    m: {model.hidden_size: 128, when: {gpt2: {model.hidden_size: 64}}}
  seed: {train.seed: [0, 1]}              # a value axis: one dotted key, a list of values (labels seed0, seed1)
exclude:                                  # optional: points to leave out, by labels (every label given must match)
  - {arch: gpt2, size: s}
slurm: {procs_per_node: 2, time: "01:00:00"}   # crate submit's job options, for --slurm
```

Every run config is validated before anything starts (one-line errors name the run and key). ``<output_root>/
sweep.json`` records each run's name, labels, directory and overrides: ``crate compare`` reads it to group runs.
Locally the runs go one after another; a run that already reached its ``max_steps`` is skipped and a partial one
resumes from its newest checkpoint, so rerunning a sweep finishes it.
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from data_pipeline.files import atomic_write
from launcher.config.run import RunConfig, load_run_config

from launcher.errors import ConfigError
from launcher.config.files import load_yaml

LABEL = re.compile(r"^[A-Za-z0-9_.+-]+$")
SWEEP_KEYS = ("name", "output_root", "command", "config", "overrides", "axes", "exclude", "slurm")


@dataclass(frozen=True)
class SweepRun:
    """One point of the grid."""

    name: str
    labels: dict[str, str]  # axis -> label
    config_path: str
    overrides: tuple[str, ...]  # dotted KEY=VALUE, output_dir last
    output_dir: str


@dataclass(frozen=True)
class Sweep:
    name: str
    output_root: Path
    command: str
    runs: tuple[SweepRun, ...]
    slurm: dict[str, Any]


def _yaml_value(value: Any) -> str:
    """A value as override text that reads back as the same YAML value."""
    return json.dumps(value) if not isinstance(value, str) else value


def _override_items(where: str, mapping: Any) -> tuple[str | None, list[str]]:
    """``{config: path, a.b: value, ...}`` -> (config path or None, ["a.b=value", ...]); ``when`` is left out."""
    if not isinstance(mapping, dict):
        raise ConfigError(f"{where}: must be a mapping of dotted keys to values (got {mapping!r})")
    config = mapping.get("config")
    if config is not None and not isinstance(config, str):
        raise ConfigError(f"{where}.config: must be a path to a run config (got {config!r})")
    return config, [f"{key}={_yaml_value(value)}" for key, value in mapping.items() if key not in ("config", "when")]


def _conditional_items(where: str, mapping: Any) -> dict[str, list[str]]:
    """A point's ``when: {label: {a.b: value}}``: overrides applied only together with that label."""
    when = mapping.get("when") if isinstance(mapping, dict) else None
    if when is None:
        return {}
    if not isinstance(when, dict):
        raise ConfigError(f"{where}.when: must map labels of other axes to overrides (got {when!r})")
    conditional = {}
    for label, overrides in when.items():
        config, items = _override_items(f"{where}.when.{label}", overrides)
        if config is not None:
            raise ConfigError(f"{where}.when.{label}.config: swap configs on an axis point, not under when")
        conditional[str(label)] = items
    return conditional


def _axis_points(axis: str, raw: Any, where: str) -> list[tuple[str, str | None, list[str], dict]]:
    """An axis's points as (label, config path or None, overrides, conditional overrides)."""
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{where}: must be a non-empty mapping (labelled points, or one key with a list of values)")
    if len(raw) == 1 and isinstance(next(iter(raw.values())), list):  # a value axis
        key, values = next(iter(raw.items()))
        if not values:
            raise ConfigError(f"{where}.{key}: the list of values is empty")
        return [(f"{axis}{value}", None, [f"{key}={_yaml_value(value)}"], {}) for value in values]
    points = []
    for label, mapping in raw.items():
        label = str(label)
        if not LABEL.match(label):
            raise ConfigError(f"{where}.{label}: a label names a directory: letters, digits, '_', '.', '+', '-'")
        mapping = mapping if mapping is not None else {}
        config, overrides = _override_items(f"{where}.{label}", mapping)
        points.append((label, config, overrides, _conditional_items(f"{where}.{label}", mapping)))
    return points


def load_sweep(path: str | Path) -> Sweep:
    """Read and expand a sweep file; every run config is validated. One-line errors name the key."""
    path = Path(path)
    try:
        raw = load_yaml(path)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such sweep file") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a sweep file holds a mapping")
    for key in raw:
        if key not in SWEEP_KEYS:
            raise ConfigError(f"{path}: {key}: unknown key; allowed keys are {list(SWEEP_KEYS)}")
    for key in ("name", "output_root", "axes"):
        if key not in raw:
            raise ConfigError(f"{path}: {key}: required")
    command = raw.get("command", "pretrain")
    if command not in ("pretrain", "finetune"):
        raise ConfigError(f"{path}: command: must be pretrain or finetune (got {command!r})")
    base_config, common = _override_items(f"{path}: overrides", raw.get("overrides") or {})
    base_config = raw.get("config", base_config)
    axes = raw["axes"]
    if not isinstance(axes, dict) or not axes:
        raise ConfigError(f"{path}: axes: must be a non-empty mapping of axis name to points")
    grid = [[(axis, *point) for point in _axis_points(axis, points, f"{path}: axes.{axis}")]
            for axis, points in axes.items()]
    excluded = raw.get("exclude") or []
    if not isinstance(excluded, list) or not all(isinstance(item, dict) for item in excluded):
        raise ConfigError(f"{path}: exclude: must be a list of {{axis: label}} mappings")
    for item in excluded:
        for axis, label in item.items():
            if axis not in axes:
                raise ConfigError(f"{path}: exclude: {axis!r} is not an axis ({list(axes)})")
            if str(label) not in {point[1] for points in grid for point in points if point[0] == axis}:
                raise ConfigError(f"{path}: exclude: {axis}={label!r} is not a label of that axis")
    output_root = Path(raw["output_root"])
    runs = []
    all_labels = {point[1] for points in grid for point in points}
    for points in grid:
        for axis, label, _, _, conditional in points:
            for other in conditional:
                if other not in all_labels:
                    raise ConfigError(f"{path}: axes.{axis}.{label}.when: {other!r} is not a label of any axis")
    for combination in itertools.product(*grid):
        labels = {axis: label for axis, label, _, _, _ in combination}
        if any(all(labels[axis] == str(label) for axis, label in item.items()) for item in excluded):
            continue
        configs = [config for _, _, config, _, _ in combination if config] or [base_config]
        if len(configs) > 1 or configs[0] is None:
            raise ConfigError(f"{path}: run {'-'.join(labels.values())}: "
                              f"{'two axes set config' if len(configs) > 1 else 'no run config (set config)'}")
        config_path = (path.parent / configs[0]).resolve()
        name = "-".join(labels.values())
        output_dir = output_root / name
        chosen = set(labels.values())
        overrides = (*common, *(item for _, _, _, items, _ in combination for item in items),
                     *(item for *_, conditional in combination for label, items in conditional.items()
                       if label in chosen for item in items),
                     f"output_dir={output_dir}")
        try:
            load_run_config(config_path, list(overrides))
        except FileNotFoundError:
            raise ConfigError(f"{path}: run {name}: config {config_path} does not exist") from None
        except ConfigError as error:
            raise ConfigError(f"{path}: run {name}: {error}") from None
        runs.append(SweepRun(name, labels, str(config_path), overrides, str(output_dir)))
    if not runs:
        raise ConfigError(f"{path}: exclude leaves no runs")
    return Sweep(str(raw["name"]), output_root, command, tuple(runs), dict(raw.get("slurm") or {}))


def write_manifest(sweep: Sweep) -> Path:
    """``<output_root>/sweep.json``: the expansion, for ``crate compare`` and for people."""
    sweep.output_root.mkdir(parents=True, exist_ok=True)
    path = sweep.output_root / "sweep.json"
    atomic_write(path, json.dumps({"name": sweep.name, "command": sweep.command,
                                   "runs": [asdict(run) for run in sweep.runs]}, indent=1))
    return path


def run_config(run: SweepRun) -> RunConfig:
    return load_run_config(run.config_path, list(run.overrides))


def finished(run: SweepRun) -> bool:
    """Whether the run has a complete checkpoint at its ``max_steps``."""
    from launcher.train.checkpoint import CheckpointManager

    steps = CheckpointManager(run.output_dir, keep_last=1).complete_steps()
    return bool(steps) and steps[-1] >= run_config(run).train.max_steps


def run_locally(sweep: Sweep, nproc_per_node: int = 1, log=print) -> int:
    """Each run in turn (``crate pretrain|finetune`` in a subprocess); finished runs are skipped. Returns the number
    of runs that failed (the others still run)."""
    failures = 0
    for index, run in enumerate(sweep.runs, 1):
        if finished(run):
            log(f"[{index}/{len(sweep.runs)}] {run.name}: finished, skipped")
            continue
        log(f"[{index}/{len(sweep.runs)}] {run.name}: crate {sweep.command} -> {run.output_dir}")
        result = subprocess.run([sys.executable, "-m", "launcher.cli", sweep.command, run.config_path,
                                 *run.overrides, f"--nproc-per-node={nproc_per_node}"])
        if result.returncode:
            failures += 1
            log(f"[{index}/{len(sweep.runs)}] {run.name}: failed (exit {result.returncode}); going on")
    return failures


def submit_sweep(sweep: Sweep, dry_run: bool = False) -> str:
    """One Slurm job array, one index per run (``crate submit``'s machinery)."""
    from launcher.cluster.submit import JobSpec, submit_runs

    allowed = {f.name for f in fields(JobSpec)} - {"command"}
    for key in sweep.slurm:
        if key not in allowed:
            raise ConfigError(f"slurm.{key}: unknown key; allowed keys are {sorted(allowed)}")
    options = {key: tuple(value) if key in ("extra_sbatch", "env") else value for key, value in sweep.slurm.items()}
    job = JobSpec(**{"job_name": f"crate-{sweep.name}", **options, "command": sweep.command})
    runs = [run_config(run) for run in sweep.runs]
    for run in runs:
        run.check_world(job.world_size)
    return submit_runs(runs, job, dry_run=dry_run)
