"""`crate submit` without a cluster: the rendered batch script, sweeps as arrays, and one-line errors."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from launcher.cluster.submit import JobSpec, render, resolve_runs, submit
from launcher.errors import ConfigError

TINY = str(Path(__file__).resolve().parents[3] / "configs" / "lm" / "crate-tiny.yaml")


def test_gpu_script_has_rendezvous_requeue_signal_and_cluster_options(tmp_path):
    job = JobSpec(
        nodes=4,
        gpus_per_node=8,
        partition="gpu",
        account="proj",
        time="2-00:00:00",
        signal_seconds=600,
        env=("NCCL_IB_DISABLE=1",),
        extra_sbatch=("--qos=high",),
    )
    script = submit([TINY], [f"output_dir={tmp_path}", "train.global_batch_size=512"], job, dry_run=True)
    for line in (
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --cpus-per-task=32",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj",
        "#SBATCH --time=2-00:00:00",
        "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@600",
        "#SBATCH --qos=high",
        "export NCCL_IB_DISABLE=1",
        "--nproc-per-node=8",
        "--rdzv-backend=c10d",
        'scontrol requeue "$SLURM_JOB_ID"',
        f"RUN_CONFIGS=({tmp_path / 'config.yaml'})",
    ):
        assert line in script, line
    # per-node values are resolved in the job, not at submit time
    assert 'HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in script
    assert "{{" not in script and not (tmp_path / "config.yaml").exists()  # a dry run writes nothing
    syntax = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr


def test_sweep_is_an_array_of_resolved_configs_in_their_own_directories(tmp_path):
    job = JobSpec(nodes=1, procs_per_node=2, array="%1")
    runs = resolve_runs([TINY], [f"output_dir={tmp_path}"], ["optimizer.lr=1e-3,3e-4", "zero.stage=1,2"], job)
    assert [(run.optimizer.lr, run.zero.stage) for run in runs] == [(1e-3, 1), (1e-3, 2), (3e-4, 1), (3e-4, 2)]
    assert runs[0].output_dir == str(tmp_path / "optimizer.lr=1e-3-zero.stage=1")
    script = render(job, [Path(run.output_dir) / "config.yaml" for run in runs], tmp_path / "slurm")
    assert "#SBATCH --array=0-3%1" in script and "%x-%A_%a.out" in script
    assert "--nproc-per-node=2" in script and "(no GPUs: a CPU partition" in script


@pytest.mark.parametrize(
    "kwargs, items, message",
    [
        ({"time": "1h"}, [], "--time: '1h' is not a Slurm time"),
        (
            {"nodes": 3},
            ["train.global_batch_size=16"],
            "train.global_batch_size: 16 is not a multiple of train.micro_batch_size (16) x world size (3)",
        ),
        ({"nodes": 0}, [], "--nodes: must be >= 1"),
        ({"env": ("1BAD",)}, [], "--env: expected KEY=VALUE"),
        ({}, ["zero.stage=7"], "zero.stage: Input should be 0, 1, 2 or 3"),
    ],
)
def test_bad_submissions_are_one_line_errors(kwargs, items, message, tmp_path):
    with pytest.raises(ConfigError) as error:
        submit([TINY], [f"output_dir={tmp_path}", *items], JobSpec(**kwargs), dry_run=True)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_two_configs_with_one_output_dir_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="share an output_dir"):
        resolve_runs([TINY, TINY], [f"output_dir={tmp_path}"], [], JobSpec())


def test_cli_accepts_overrides_after_options(tmp_path):
    from launcher.cli import main

    assert main(["submit", TINY, "--nodes", "2", f"output_dir={tmp_path}", "--dry-run"]) == 0
