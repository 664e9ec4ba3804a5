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
  budget: {c1e13: {train.flops_budget: 1.0e13}}  # max_steps that spend these training FLOPs (cluster.budget)
exclude:                                  # optional: points to leave out, by labels (every label given must match)
  - {arch: gpt2, size: s}
slurm: {procs_per_node: 2, time: "01:00:00"}   # crate submit's job options, for --slurm
```

The file is a ``launcher.cluster.spec.SweepFile`` (its ``slurm:`` section included, checked on loading) expanded by
``spec.expand``, the grid expander ``crate submit --sweep`` uses too. Every run config is validated before anything
starts (one-line errors name the run and key). ``<output_root>/
sweep.json`` records each run's name, labels, directory and overrides: ``crate compare`` reads it to group runs.
Locally the runs go one after another; a run that already reached its ``max_steps`` is skipped and a partial one
resumes from its newest checkpoint, so rerunning a sweep finishes it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from data_pipeline.files import atomic_write
from launcher.cluster.budget import resolve_flops_budget
from launcher.cluster.spec import JobOptions, JobSpec, SweepFile, expand, grid_key, override_items
from launcher.cluster.submit import submit_runs
from launcher.config.files import load_yaml
from launcher.config.run import RunConfig, load_run_config
from launcher.config.validation import validate
from launcher.errors import ConfigError


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
    slurm: JobOptions


def read_grid_file(path: Path) -> dict:
    """A sweep (or tuning) file's raw mapping; one-line errors."""
    try:
        raw = load_yaml(path)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such sweep file") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a sweep file holds a mapping")
    return raw


def load_sweep(path: str | Path) -> Sweep:
    """Read, check and expand a sweep file; every run config is validated. One-line errors name the key."""
    path = Path(path)
    raw = read_grid_file(path)
    if "tune" in raw:
        raise ConfigError(f"{path}: tune: a tuning file; run it with crate tune")
    return build_sweep(validate(SweepFile, raw, source=str(path), name=grid_key), path)


def build_sweep(spec: SweepFile, path: Path) -> Sweep:
    """Expand a checked sweep file (read from ``path``: configs are relative to it); every run config is
    validated."""
    try:
        points = expand(spec)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    output_root = Path(spec.output_root)
    common = override_items(spec.overrides)
    runs = []
    for point in points:
        configs = point.configs or (spec.base_config,)
        if len(configs) > 1 or configs[0] is None:
            raise ConfigError(
                f"{path}: run {point.name}: "
                f"{'two axes set config' if len(configs) > 1 else 'no run config (set config)'}"
            )
        config_path = (path.parent / configs[0]).resolve()
        output_dir = output_root / point.name
        overrides = (*common, *point.overrides, f"output_dir={output_dir}")
        try:
            overrides = resolve_flops_budget(str(config_path), overrides)
            load_run_config(config_path, list(overrides))
        except FileNotFoundError:
            raise ConfigError(f"{path}: run {point.name}: config {config_path} does not exist") from None
        except ConfigError as error:
            raise ConfigError(f"{path}: run {point.name}: {error}") from None
        runs.append(SweepRun(point.name, point.labels, str(config_path), overrides, str(output_dir)))
    return Sweep(spec.name, output_root, spec.command, tuple(runs), spec.slurm)


def write_manifest(sweep: Sweep) -> Path:
    """``<output_root>/sweep.json``: the expansion, for ``crate compare`` and for people."""
    sweep.output_root.mkdir(parents=True, exist_ok=True)
    path = sweep.output_root / "sweep.json"
    atomic_write(
        path,
        json.dumps(
            {"name": sweep.name, "command": sweep.command, "runs": [asdict(run) for run in sweep.runs]}, indent=1
        ),
    )
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
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "launcher.cli",
                sweep.command,
                run.config_path,
                *run.overrides,
                f"--nproc-per-node={nproc_per_node}",
            ]
        )
        if result.returncode:
            failures += 1
            log(f"[{index}/{len(sweep.runs)}] {run.name}: failed (exit {result.returncode}); going on")
    return failures


def submit_sweep(sweep: Sweep, dry_run: bool = False) -> str:
    """One Slurm job array, one index per run (``crate submit``'s machinery)."""
    job = JobSpec(
        **{"job_name": f"crate-{sweep.name}", **sweep.slurm.model_dump(exclude_unset=True), "command": sweep.command}
    )
    runs = [run_config(run) for run in sweep.runs]
    for run in runs:
        run.check_world(job.world_size)
    return submit_runs(runs, job, dry_run=dry_run)
