"""`crate submit` on a real Slurm: a 2-node cluster on this host (slurm/local_cluster.sh: Debian's slurmctld, slurmd
and munge). A 2-node DeepSpeed run of a tiny CRATE, a preemption (USR1, save, requeue, resume) that ends equal to an
uninterrupted run, and a job array. Where Slurm cannot be installed they skip with the reason, except in CI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.crate_cli import TINY_CRATE
from tests.slurm_cluster import ensure_cluster, wait_for_job, wait_until_idle

REPO = Path(__file__).resolve().parents[3]
TINY = REPO / "configs" / "lm" / "crate-tiny.yaml"
SMALL = [
    *TINY_CRATE,
    "train.log_every=1",
    "train.stop_check_every=2",  # a preemption is obeyed within a step of the signal, long before max_steps
    "train.eval_every=0",
    "train.whitebox_every=0",
    "optimizer.warmup_steps=2",
    "optimizer.lr=1.0e-2",
    "optimizer.min_lr=1.0e-3",
    "zero.stage=3",
]
JOB_TIMEOUT = 600

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def cluster(tmp_path_factory):
    try:
        ensure_cluster()
    except RuntimeError as error:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"no local Slurm cluster: {str(error).splitlines()[0]}")
    from launcher.config.run import load_run_config
    from launcher.models.tokenizers import prepare_tokenizer, trained_tokenizer_dir

    root = tmp_path_factory.mktemp("tokenizer")  # trained once, not by every job
    prepare_tokenizer("bpe:512", root, load_run_config(TINY).data)
    SMALL.append(f"tokenizer={trained_tokenizer_dir(root)}")
    yield
    SMALL.pop()


def submit(output_dir: Path, *args: str) -> str:
    command = [sys.executable, "-m", "launcher.cli", "submit", str(TINY), f"output_dir={output_dir}", *SMALL, *args]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("submitted job "), result.stdout
    return result.stdout.split()[-1]


def job_log(output_dir: Path) -> str:
    return "\n".join(path.read_text() for path in sorted((output_dir / "slurm").glob("*.out")))


def finished(job_id: str, output_dir: Path) -> None:
    state = wait_for_job(job_id, JOB_TIMEOUT)
    assert state == "COMPLETED", f"job {job_id} ended {state}:\n{job_log(output_dir)[-6000:]}"


def weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "hf" / "model.safetensors")


# A fixed global batch and data order (2 logical streams): the same batches on 1 node as on 2
ELASTIC = (
    "train.max_steps=6",
    "train.save_every=0",
    "train.batch_fingerprints=true",
    "data.num_streams=2",
    "train.global_batch_size=8",
    "--partition=debug",
    "--time=15",
)


def rows(output_dir: Path, key: str) -> dict:
    from launcher.metrics.logger import read_metrics

    return {row["step"]: row[key] for row in read_metrics(output_dir, kind="train") if key in row}


def starts(output_dir: Path) -> list[dict]:
    from launcher.metrics.logger import read_metrics

    return [row for row in read_metrics(output_dir, kind="train") if row.get("event") == "start"]


def wait_for_step(output_dir: Path, step: int) -> None:
    metrics, deadline = output_dir / "metrics.jsonl", time.time() + JOB_TIMEOUT
    while time.time() < deadline and not (metrics.exists() and f'"step": {step},' in metrics.read_text()):
        time.sleep(0.5)


def requeued_and_pending(job: str) -> int:
    """Wait until ``job`` was requeued and waits in the queue; its CPUs per task."""
    deadline = time.time() + JOB_TIMEOUT
    while time.time() < deadline:
        shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
        if "JobState=PENDING" in shown and "Restarts=0" not in shown:
            return int(re.search(r"CPUs/Task=(\d+)", shown).group(1))
        time.sleep(0.5)
    raise AssertionError(f"job {job} was not requeued within {JOB_TIMEOUT} s")


@pytest.fixture(scope="module")
def one_node_run(tmp_path_factory) -> Path:
    """The uninterrupted reference: the elastic recipe on 1 node."""
    run = tmp_path_factory.mktemp("straight") / "run"
    finished(submit(run, *ELASTIC, "--nodes=1"), run)
    return run


def assert_continues_as_uninterrupted(run: Path, uninterrupted: Path) -> None:
    assert rows(run, "batch_fingerprint") == rows(uninterrupted, "batch_fingerprint")  # every step's global batch
    assert len(rows(run, "batch_fingerprint")) == 6
    losses, expected = rows(run, "loss"), rows(uninterrupted, "loss")
    torch.testing.assert_close(list(losses.values()), list(expected.values()), rtol=1e-4, atol=0.0)
    a, b = weights(run), weights(uninterrupted)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5, msg=key)


def test_a_two_node_run_stopped_and_resubmitted_on_one_node_resumes_as_if_uninterrupted(tmp_path, one_node_run):
    run = tmp_path / "run"
    job = submit(run, *ELASTIC, "--nodes=2")
    wait_for_step(run, 1)
    (run / "STOP").touch()  # the trainers save at an agreed step and exit 0
    finished(job, run)
    finished(submit(run, *ELASTIC, "--nodes=1"), run)  # `crate submit` of the run with another --nodes
    first, second = starts(run)
    assert (first["world_size"], second["world_size"], second["resumed_from_world_size"]) == (2, 1, 2)
    assert second["gradient_accumulation_steps"] == 2 * first["gradient_accumulation_steps"]
    from launcher.metrics.logger import read_metrics

    stopped = [row["step"] for row in read_metrics(run, kind="train") if row.get("event") == "stopped"]
    assert stopped and stopped[0] < 6, job_log(run)[-4000:]
    assert "[crate]" in job_log(run) and (run / "slurm").glob("job-*.sbatch")
    assert_continues_as_uninterrupted(run, one_node_run)
    from transformers import AutoModelForCausalLM

    import crate_lm  # noqa: F401

    assert AutoModelForCausalLM.from_pretrained(run / "hf").config.num_hidden_layers == 2


def test_a_requeued_job_that_gets_fewer_nodes_resumes_on_them(tmp_path, one_node_run):
    """A node fails: the 2-node job is preempted (USR1), saves and requeues itself; with its second node drained it
    cannot start again until its node count is lowered (``scontrol update NumNodes=1``, what an operator does); it
    then starts on the one node left and resumes there."""
    run = tmp_path / "run"
    wait_until_idle()
    job = submit(run, *ELASTIC, "--nodes=2")
    wait_for_step(run, 1)
    try:
        subprocess.run(["scontrol", "update", "nodename=n2", "state=drain", "reason=crate-elastic-test"], check=True)
        subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
        cpus_per_task = requeued_and_pending(job)
        # the node count with the task and CPU counts that follow from it (Slurm keeps the old ones otherwise)
        subprocess.run(
            ["scontrol", "update", f"jobid={job}", "NumNodes=1", "NumTasks=1", f"NumCPUs={cpus_per_task}"], check=True
        )
        finished(job, run)
    finally:
        subprocess.run(["scontrol", "update", "nodename=n2", "state=resume"], check=False)
    log = job_log(run)
    assert "(restart 1)" in log, log[-6000:]
    assert [row["world_size"] for row in starts(run)] == [2, 1], log[-6000:]
    assert_continues_as_uninterrupted(run, one_node_run)


def test_preempted_run_requeues_resumes_and_equals_an_uninterrupted_run(tmp_path):
    straight, preempted = tmp_path / "straight", tmp_path / "preempted"
    recipe = ("train.max_steps=40", "train.save_every=10", "--nodes=2")
    job = submit(preempted, *recipe)
    deadline = time.time() + JOB_TIMEOUT
    metrics = preempted / "metrics.jsonl"
    while time.time() < deadline and not (metrics.exists() and '"step": 5,' in metrics.read_text()):
        time.sleep(0.5)
    # As Slurm does before the time limit (--signal=B:USR1@...): USR1 to the batch shell only
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
    finished(job, preempted)
    log = job_log(preempted)
    assert "USR1: asking the trainers to save and stop" in log and "requeueing job" in log, log[-6000:]
    assert "(restart 1)" in log, log[-6000:]
    from launcher.metrics.logger import read_metrics

    rows = read_metrics(preempted, kind="train")
    stops = [row for row in rows if row.get("event") == "stopped"]
    assert stops and stops[0]["reason"] == "stop_file" and stops[0]["step"] < 40
    assert [row["resumed"] for row in rows if row.get("event") == "start"] == [False, True]

    finished(submit(straight, *recipe), straight)
    a, b = weights(straight), weights(preempted)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [
        [row["loss"] for row in read_metrics(run, kind="train") if "loss" in row] for run in (straight, preempted)
    ]
    assert losses[0] == losses[1]  # the data neither repeats nor skips across the requeue


def test_sweep_runs_as_a_job_array(tmp_path):
    run = tmp_path / "sweep"
    job = submit(run, "train.max_steps=3", "train.save_every=3", "--nodes=1", "--sweep=optimizer.lr=1e-2,5e-3")
    finished(job, run / "optimizer.lr=1e-2")
    for value in ("1e-2", "5e-3"):
        member = run / f"optimizer.lr={value}"
        assert (member / "hf" / "model.safetensors").exists(), job_log(run)[-4000:]
        from launcher.config.run import load_run_config

        assert load_run_config(member / "config.yaml").optimizer.lr == float(value)


def test_slurm_preemption_by_a_higher_priority_job_requeues_and_resumes(tmp_path):
    """Real preemption: a job on partition `urgent` takes the nodes; ours gets its USR1 at once
    (preempt_send_user_signal), saves at an agreed step, requeues itself, and finishes after the urgent job."""
    run = tmp_path / "run"
    job = submit(run, "train.max_steps=30", "train.save_every=0", "--nodes=2", "--partition=debug")
    metrics = run / "metrics.jsonl"
    deadline = time.time() + JOB_TIMEOUT
    while time.time() < deadline and not (metrics.exists() and '"step": 5,' in metrics.read_text()):
        time.sleep(0.5)
    urgent = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--partition=urgent",
            "--nodes=2",
            "--ntasks-per-node=1",
            f"--output={tmp_path / 'urgent.out'}",
            "--wrap",
            "srun hostname",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert wait_for_job(urgent, JOB_TIMEOUT) == "COMPLETED"
    finished(job, run)
    from launcher.metrics.logger import read_metrics

    rows = read_metrics(run, kind="train")
    stops = [row for row in rows if row.get("event") == "stopped"]
    assert stops and stops[0]["reason"] == "stop_file" and 5 <= stops[0]["step"] < 30, job_log(run)[-4000:]
    assert [row["resumed"] for row in rows if row.get("event") == "start"] == [False, True]
    assert (run / "checkpoints" / "global_step30").is_dir() and (run / "hf" / "model.safetensors").exists()


def test_crate_sweep_submits_a_two_element_job_array_of_crate_and_gpt2(tmp_path):
    import yaml

    root = tmp_path / "sweep"
    small = dict(item.split("=", 1) for item in SMALL)
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(
        yaml.safe_dump(
            {
                "name": "arch",
                "output_root": str(root),
                "config": str(TINY),
                "overrides": {
                    **{key: yaml.safe_load(value) for key, value in small.items()},
                    "train.max_steps": 3,
                    "train.save_every": 3,
                },
                "axes": {"arch": {"crate": {}, "gpt2": {"config": str(REPO / "configs" / "lm" / "gpt2-tiny.yaml")}}},
                "slurm": {"nodes": 1, "time": "15"},
            }
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "sweep", str(sweep_file), "--slurm"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    job = result.stdout.split("submitted job array ")[1].split()[0]
    finished(job, root / "crate")
    from transformers import AutoConfig

    import crate_lm  # noqa: F401

    assert AutoConfig.from_pretrained(root / "crate" / "hf").model_type == "crate", job_log(root / "crate")[-4000:]
    assert AutoConfig.from_pretrained(root / "gpt2" / "hf").model_type == "gpt2", job_log(root / "crate")[-4000:]
    assert json.loads((root / "sweep.json").read_text())["runs"][1]["labels"] == {"arch": "gpt2"}
