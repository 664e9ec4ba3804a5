"""``crate submit``: a run config (or a sweep of them) as a Slurm batch job.

The run config is validated and resolved here, on the login node, for the job's world size; the resolved file
(``<output_dir>/config.yaml``) is what the job trains, so later edits of the source YAML never change a requeued job.
The batch script is ``slurm/train.sbatch`` with its ``{{fields}}`` filled in, saved as
``<output_dir>/slurm/job-<time>.sbatch`` (for a sweep, in the first run's directory), and passed to ``sbatch``.

A sweep is a job array, one resolved config per index: several CONFIG files, and/or ``--sweep KEY=V1,V2`` (repeatable;
the cartesian product), each combination in ``<output_dir>/<key>=<value>-...``. ``--sweep`` is a grid of value axes
expanded by the sweep files' expander (``launcher.cluster.spec.expand``), its points named by their overrides.

What goes into the script cannot add lines to it or break one: the job options refuse control characters
(``launcher.cluster.spec``), and so do the run directories here. The shell lines take every value through
``shlex.quote``. An ``#SBATCH`` line is read by sbatch, not the shell: sbatch splits it at whitespace, reads an
unquoted ``#`` as the start of a comment and takes quotes and backslashes as quoting; so every value crate puts there
(job name, partition, account, time, array, the log path) is written as is when it is one plain word and in double
quotes otherwise (``sbatch_value``): a log directory with spaces or a ``#`` works. A ``%`` in the log directory is
written ``%%`` (sbatch's filename patterns); a backslash there is refused, as it would turn those patterns off. The
``--sbatch`` items are sbatch's own text and go in as given.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from launcher.cluster.spec import Grid, JobSpec, expand, grid_key, override_name, single_line
from launcher.config.run import RunConfig, load_run_config, save_run_config
from launcher.config.validation import validate
from launcher.errors import ClusterError, ConfigError
from launcher.train.elastic import check_resume

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "slurm" / "train.sbatch"
FIELD = re.compile(r"\{\{(\w+)\}\}")
PLAIN_SBATCH_WORD = re.compile(r"""^[^\s"'\\#]+$""")  # what sbatch reads back unchanged, unquoted


def sbatch_value(value: str) -> str:
    """A value for an ``#SBATCH --key=VALUE`` line, as sbatch will read it back: as is when it is one plain word,
    else in double quotes with its backslashes and double quotes escaped."""
    if PLAIN_SBATCH_WORD.match(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _log_pattern(log_dir: Path, log_name: str) -> str:
    """``#SBATCH --output``'s value: ``log_name`` (sbatch's ``%`` patterns) in ``log_dir`` (taken literally)."""
    if "\\" in str(log_dir):  # sbatch expands no filename pattern in a path with a backslash: all in one log
        raise ConfigError(f"output_dir: the Slurm log directory must not contain a backslash (got {str(log_dir)!r})")
    return sbatch_value(f"{str(log_dir).replace('%', '%%')}/{log_name}")


def sweep_grid(sweeps: list[str]) -> Grid:
    """``["optimizer.lr=1e-3,3e-4", "zero.stage=1,2"]`` -> a grid of value axes, one a ``--sweep``, in order."""
    axes = {}
    for item in sweeps:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise ConfigError(f"--sweep {item!r}: expected KEY=V1,V2,...")
        # An axis is named by its key; a key swept twice still makes a second axis (the later value wins)
        axes[key if key not in axes else f"{key} ({len(axes) + 1})"] = {key: values.split(",")}
    return validate(Grid, {"axes": axes}, source="--sweep", name=grid_key)


def resolve_runs(configs: list[str], overrides: list[str], sweeps: list[str], job: JobSpec) -> list[RunConfig]:
    """Every run of the job, validated for its world size, a checkpoint to resume from included (one-line errors
    naming the file and key)."""
    if not configs:
        raise ConfigError("crate submit: give at least one CONFIG file")
    points = expand(sweep_grid(sweeps), name=override_name) if sweeps else [None]
    runs = []
    for config_path in configs:
        for point in points:
            config = load_run_config(config_path, [*overrides, *(point.overrides if point else ())])
            if point:  # each sweep member in its own directory under the run's
                config = config.model_copy(update={"output_dir": str(Path(config.output_dir) / point.name)})
            config.check_world(job.world_size)
            check_resume(config, job.world_size)  # a resubmitted run may change its world size (train.elastic)
            runs.append(config)
    directories = [Path(run.output_dir).resolve() for run in runs]
    if len(set(directories)) != len(directories):
        raise ConfigError("crate submit: two runs of this job share an output_dir; give each config its own")
    return runs


def render(
    job: JobSpec, config_files: list[Path], log_dir: Path, python: str = sys.executable, workdir: Path = REPO
) -> str:
    """The batch script: ``slurm/train.sbatch`` with its fields filled in for ``job`` and the runs' resolved
    configs; the Slurm logs go to ``log_dir``. A run directory with a control character is a ConfigError."""
    for path in (*config_files, log_dir):
        try:
            single_line(str(path))
        except ConfigError as error:
            raise ConfigError(f"output_dir: {error}") from None
    optional = [
        f"#SBATCH --{name}={sbatch_value(value)}"
        for name, value in (("partition", job.partition), ("account", job.account), ("time", job.time))
        if value
    ]
    if len(config_files) > 1 or job.array:
        indices = f"0-{len(config_files) - 1}{job.array or ''}"
        optional.append(f"#SBATCH --array={sbatch_value(indices)}")
    optional += [f"#SBATCH {item}" for item in job.extra_sbatch]
    cpus = job.cpus_per_task or max(
        job.ranks_per_node, (os.cpu_count() or 1) if not job.gpus_per_node else 4 * job.gpus_per_node
    )
    log_name = "%x-%A_%a.out" if len(config_files) > 1 or job.array else "%x-%j.out"
    fields = {
        "job_name": sbatch_value(job.job_name or f"crate-{config_files[0].parent.name}"),
        "nodes": str(job.nodes),
        "gpu_line": f"#SBATCH --gpus-per-node={job.gpus_per_node}"
        if job.gpus_per_node
        else "# (no GPUs: a CPU partition; DeepSpeed runs its CPU accelerator over gloo)",
        "cpus_per_task": str(cpus),
        "optional_lines": "\n".join(optional) if optional else "# (partition, account, time: the cluster's defaults)",
        "signal_seconds": str(job.signal_seconds),
        "log_pattern": _log_pattern(log_dir, log_name),
        "configs": " ".join(shlex.quote(str(path)) for path in config_files),
        "workdir": shlex.quote(str(workdir)),
        "env_lines": "\n".join(
            f"export {shlex.quote(item.split('=', 1)[0])}={shlex.quote(item.split('=', 1)[1])}" for item in job.env
        )
        or "# (no extra environment)",
        "procs_per_node": str(job.ranks_per_node),
        "python": shlex.quote(python),
        "command": shlex.quote(job.command),
    }
    template = TEMPLATE.read_text()
    missing = set(FIELD.findall(template)) - set(fields)
    if missing:
        raise RuntimeError(f"{TEMPLATE}: unknown fields {sorted(missing)}")
    return FIELD.sub(lambda match: fields[match.group(1)], template)


def submit(
    configs: list[str],
    overrides: list[str],
    job: JobSpec,
    sweeps: list[str] = (),
    dry_run: bool = False,
) -> str:
    """Validate, save the resolved configs and the script, call sbatch. Returns the job id, or the script for
    ``dry_run`` (nothing is written then)."""
    return submit_runs(resolve_runs(configs, overrides, list(sweeps), job), job, dry_run)


def submit_runs(runs: list[RunConfig], job: JobSpec, dry_run: bool = False) -> str:
    """Submit validated run configs as one job (an array when there are several). Returns the job id, or the
    script for ``dry_run``."""
    config_files = [Path(run.output_dir).resolve() / "config.yaml" for run in runs]
    log_dir = Path(runs[0].output_dir).resolve() / "slurm"
    script = render(job, config_files, log_dir)
    if dry_run:
        return script
    if shutil.which("sbatch") is None:
        raise ClusterError("sbatch not found: run crate submit on a Slurm login node (or use --dry-run)")
    for run, path in zip(runs, config_files, strict=True):
        save_run_config(run, path)
    log_dir.mkdir(parents=True, exist_ok=True)
    script_path = log_dir / f"job-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
    script_path.write_text(script)
    result = subprocess.run(["sbatch", "--parsable", str(script_path)], capture_output=True, text=True)
    if result.returncode:
        raise ClusterError(f"sbatch failed: {result.stderr.strip().splitlines()[-1] if result.stderr else ''}")
    job_id = result.stdout.strip().split(";")[0]
    (log_dir / f"job-{job_id}.sbatch").write_text(script)
    script_path.unlink()
    return job_id
