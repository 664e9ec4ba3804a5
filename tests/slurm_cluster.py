"""Helpers for tests that run against the real two-node Slurm cluster of ``slurm/local_cluster.sh``.

Not a test module. ``ensure_cluster()`` installs/starts the cluster (nodes ``n1``, ``n2`` on this host,
partitions ``debug`` (default) and ``urgent`` (preempts ``debug`` jobs by requeueing them)) once per
process; ``wait_for_job()`` polls a job until it reaches a terminal state.

The cluster has no accounting daemon, so ``sacct`` does not work there. Job states come from
``scontrol show job -o JOBID``: slurmctld keeps finished jobs for ``MinJobAge`` (3600 s) in that
cluster. ``sacct`` is only a fallback for a job slurmctld no longer knows (e.g. on a cluster with
accounting).
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CLUSTER_SCRIPT = REPO_ROOT / "slurm" / "local_cluster.sh"

#: Job states after which a job no longer changes by itself.
TERMINAL_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "REVOKED",
        "SPECIAL_EXIT",
        "TIMEOUT",
    }
)

_lock = threading.Lock()
_cluster_up = False


def ensure_cluster() -> None:
    """Start the local Slurm cluster (idempotent; runs the script at most once per process).

    Raises ``RuntimeError`` with the script's output (which includes the daemons' log tails) when it fails.
    """
    global _cluster_up
    with _lock:
        if _cluster_up:
            return
        try:
            proc = subprocess.run(
                ["bash", str(CLUSTER_SCRIPT), "up"],
                cwd=REPO_ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=900,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise RuntimeError(f"{CLUSTER_SCRIPT} up did not finish: {exc}") from exc
        if proc.returncode != 0:
            raise RuntimeError(f"{CLUSTER_SCRIPT} up failed (exit {proc.returncode}):\n{proc.stdout}")
        _cluster_up = True


def _scontrol_states(job_id: str) -> list[str] | None:
    """States of the job (one per array task / het component), or None when slurmctld doesn't know it."""
    proc = subprocess.run(
        ["scontrol", "show", "job", "-o", str(job_id)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if proc.returncode != 0:
        if "Invalid job id" in proc.stdout:
            return None
        raise RuntimeError(f"scontrol show job {job_id} failed: {proc.stdout.strip()}")
    states = re.findall(r"\bJobState=(\S+)", proc.stdout)
    return states or None


def _sacct_states(job_id: str) -> list[str] | None:
    """States from accounting (allocation lines only), or None when sacct can't tell."""
    try:
        proc = subprocess.run(
            ["sacct", "-n", "-X", "-P", "-o", "State", "-j", str(job_id)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    # "CANCELLED by 0" -> "CANCELLED"
    states = [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]
    return states or None


def job_state(job_id: str) -> str | None:
    """Current state of a job; for an array (``JOBID`` of all tasks) the first non-terminal state if any,
    else the first state other than COMPLETED, else COMPLETED. None when neither scontrol nor sacct knows it."""
    states = _scontrol_states(job_id)
    if states is None:
        states = _sacct_states(job_id)
    if not states:
        return None
    for state in states:
        if state not in TERMINAL_STATES:
            return state
    for state in states:
        if state != "COMPLETED":
            return state
    return "COMPLETED"


def wait_for_job(job_id: str, timeout: float) -> str:
    """Poll the job until it reaches a terminal state and return that state.

    States: COMPLETED, FAILED, CANCELLED, TIMEOUT, NODE_FAIL, OUT_OF_MEMORY, PREEMPTED, ... (see
    ``TERMINAL_STATES``). A requeued job passes through REQUEUED/PENDING and is waited for again. For a job
    array id, waits for every task and returns COMPLETED only if all tasks completed (else the first other
    state). Raises ``TimeoutError`` (with ``scontrol show job`` output) after ``timeout`` seconds and
    ``RuntimeError`` if the job is unknown to both scontrol and sacct.
    """
    job_id = str(job_id).strip().split(";")[0]  # accept `sbatch --parsable` output ("ID[;cluster]")
    deadline = time.monotonic() + timeout
    delay = 0.25
    unknown_since: float | None = None
    while True:
        state = job_state(job_id)
        if state in TERMINAL_STATES:
            return state
        now = time.monotonic()
        if state is None:
            # A job id straight from sbatch is known at once; allow a short grace period anyway.
            unknown_since = unknown_since if unknown_since is not None else now
            if now - unknown_since > 5 or now >= deadline:
                raise RuntimeError(f"job {job_id} is unknown to slurmctld (scontrol) and to sacct")
        else:
            unknown_since = None
        if now >= deadline:
            detail = subprocess.run(
                ["scontrol", "show", "job", str(job_id)],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            ).stdout
            raise TimeoutError(f"job {job_id} still {state} after {timeout:.0f}s:\n{detail}")
        time.sleep(min(delay, max(0.0, deadline - now)))
        delay = min(delay * 1.5, 2.0)


def wait_until_idle(nodes: tuple[str, ...] = ("n1", "n2"), timeout: float = 120) -> None:
    """Wait until ``nodes`` are all idle (a job that just ended may still hold one, "completing"), so that a job of
    a node range starts on all of them."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        states = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%N %T", "-n", ",".join(nodes)], capture_output=True, text=True
        ).stdout.split("\n")
        idle = {line.split()[0] for line in states if line.strip().endswith("idle")}
        if idle >= set(nodes):
            return
        time.sleep(0.5)
    raise RuntimeError(f"Slurm nodes {nodes} not idle after {timeout} s")
