"""`crate submit` without a cluster: the rendered batch script, sweeps as arrays, and one-line errors."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.cluster.submit import JobSpec, render, resolve_runs, submit
from launcher.errors import ConfigError
from tests.crate_cli import REPO

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


def test_a_resubmission_on_another_node_count_is_checked_at_submission(tmp_path):
    from launcher.errors import CheckpointError
    from launcher.train.checkpoint import CheckpointManager

    old = tmp_path / "old"  # a checkpoint from before elastic resume: its own world size only
    CheckpointManager(old, keep_last=1).save(
        4, lambda root, tag: (root / tag).mkdir(parents=True), {"step": 4, "world_size": 2, "zero_stage": 2}
    )
    assert len(resolve_runs([TINY], [f"output_dir={old}"], [], JobSpec(nodes=1, gpus_per_node=2))) == 1
    with pytest.raises(CheckpointError, match=r"global_step4: written by 2 ranks before crate recorded"):
        resolve_runs([TINY], [f"output_dir={old}"], [], JobSpec(nodes=2, gpus_per_node=2))
    facts = {"step": 4, "world_size": 2, "zero_stage": 2, "micro_batch_size": 16, "global_batch_size": 64}
    CheckpointManager(tmp_path / "new", keep_last=1).save(
        4, lambda root, tag: (root / tag).mkdir(parents=True), {**facts, "samples_seen": 256, "data_streams": 4}
    )
    for nodes in (1, 2, 4):  # the global batch of 64 stays; 4 logical streams divide among 1, 2 and 4 ranks
        resolve_runs([TINY], [f"output_dir={tmp_path / 'new'}"], [], JobSpec(nodes=nodes, procs_per_node=1))
    with pytest.raises(ConfigError, match="logical streams .* do not divide among 3 ranks"):
        resolve_runs([TINY], [f"output_dir={tmp_path / 'new'}"], [], JobSpec(nodes=3))


def test_cli_accepts_overrides_after_options(tmp_path):
    from launcher.cli import main

    assert main(["submit", TINY, "--nodes", "2", f"output_dir={tmp_path}", "--dry-run"]) == 0


INJECTED = "gpu\nrm -rf ~"


@pytest.mark.parametrize(
    "flag, value, shown",
    [
        ("--partition", INJECTED, INJECTED),
        ("--account", INJECTED, INJECTED),
        ("--job-name", INJECTED, INJECTED),
        ("--time", "1:00\n", "1:00\n"),  # Slurm's time pattern alone would let a trailing newline through
        ("--array", "%2\nrm -rf ~", "%2\nrm -rf ~"),
        ("--sbatch", "--qos=high\nrm -rf ~", "--qos=high\nrm -rf ~"),
        ("--env", "A=1\nrm -rf ~", "A=1\nrm -rf ~"),
        ("--sbatch", "--qos=high\r", "--qos=high\r"),
    ],
)
def test_control_characters_in_job_options_are_refused_before_anything_is_written(
    flag, value, shown, tmp_path, monkeypatch, capsys
):
    from launcher.cli import main
    from launcher.cluster import submit as submit_module

    calls = []
    monkeypatch.setattr(submit_module.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(submit_module.subprocess, "run", lambda *args, **kwargs: calls.append(args))
    output_dir = tmp_path / "run"
    assert main(["submit", TINY, f"{flag}={value}", f"output_dir={output_dir}"]) == 2
    stderr = capsys.readouterr().err
    assert stderr == f"crate submit: error: {flag}: must not contain control characters (got {shown!r})\n"
    assert not calls and not output_dir.exists()


def sbatch_directives(script: str) -> list[list[str]]:
    """The ``#SBATCH`` lines before the first command, each as the arguments sbatch reads from it (split at
    whitespace, double quotes and backslashes as quoting, an unquoted ``#`` starting a comment)."""
    header = script.split("set -euo pipefail")[0]
    return [
        shlex.split(line.removeprefix("#SBATCH"), comments=True)
        for line in header.splitlines()
        if line.startswith("#SBATCH")
    ]


def test_a_log_directory_with_spaces_keeps_every_directive(tmp_path):
    output_dir = tmp_path / "my runs#1 50%"  # (" #" would start a YAML comment in the override)
    job = JobSpec(partition="gpu", time="01:00:00", job_name="a b", cpus_per_task=2, extra_sbatch=("--qos=high",))
    script = submit([TINY], [f"output_dir={output_dir}"], job, dry_run=True)
    assert sbatch_directives(script) == [
        ["--job-name=a b"],
        ["--nodes=1"],
        ["--ntasks-per-node=1"],
        ["--cpus-per-task=2"],
        ["--partition=gpu"],
        ["--time=01:00:00"],
        ["--qos=high"],
        ["--requeue"],
        ["--signal=B:USR1@300"],
        [f"--output={str(output_dir).replace('%', '%%')}/slurm/%x-%j.out"],
        ["--open-mode=append"],
    ]
    assert f"RUN_CONFIGS=({shlex.quote(str(output_dir / 'config.yaml'))})" in script
    syntax = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr


def test_run_directories_that_would_break_the_script_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"^output_dir: must not contain control characters \(got '.*\\n.*'\)$"):
        # in YAML's double quotes "\n" is a newline (a plain scalar would fold one into a space)
        submit([TINY], [f'output_dir="{tmp_path}/a\\nb"'], JobSpec(), dry_run=True)
    with pytest.raises(ConfigError, match=r"^output_dir: the Slurm log directory must not contain a backslash"):
        submit([TINY], [f"output_dir={tmp_path}/a\\b"], JobSpec(), dry_run=True)


def test_a_newline_in_a_flag_is_one_line_on_stderr_and_exit_2(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "submit", TINY, "--partition", INJECTED, "--dry-run"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 2 and result.stdout == ""
    assert (
        result.stderr == f"crate submit: error: --partition: must not contain control characters (got {INJECTED!r})\n"
    )
