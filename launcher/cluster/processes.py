"""The process tree of ``crate pretrain --nproc-per-node N``: start the ranks, pass signals on, end them all when one
fails (SIGTERM, then SIGKILL), and let no rank outlive the launcher. Only the standard library: the launcher's and
the ranks' own part of ``crate pretrain`` is in ``launcher.cluster.local``."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

LAUNCHER_PID_ENV = "CRATE_LAUNCHER_PID"  # set by spawn_local: its ranks end when this process dies
KILL_GRACE_SECONDS = 30  # after a rank fails, the others have this long to exit on SIGTERM before SIGKILL (torchrun's)
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def free_port() -> int:
    """A TCP port free on this machine now (for the ranks' rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def end_with_the_launcher() -> None:
    """In a rank started by ``spawn_local``: SIGTERM when the launcher dies, even by SIGKILL, so no rank lives on as an
    orphan (Linux's parent-death signal; elsewhere nothing). SIGTERM is the graceful stop: the ranks, all alive,
    agree on a step, save and exit 0; a rank that is hung as well is the watchdog's (``launcher.train.watchdog``)."""
    launcher = os.environ.get(LAUNCHER_PID_ENV)
    if launcher is None or not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != int(launcher):  # it died before the prctl: the signal will never come, so send it now
        os.kill(os.getpid(), signal.SIGTERM)


def _as_exit_status(returncode: int) -> int:
    """A rank's return code as this process's exit status: a rank killed by signal N gives 128 + N, as in a shell
    (``sys.exit(-9)`` would give 247)."""
    return 128 - returncode if returncode < 0 else returncode


def spawn_local(command: list[str], nproc: int) -> int:
    """Start ``nproc`` ranks on this machine (the environment torchrun would give them) and wait for them.

    SIGTERM / SIGUSR1 sent to this process are passed on to every rank, whose handlers agree on a step, save and exit
    0 — the graceful stop. If a rank fails, the others are sent SIGTERM, and SIGKILL (one line) if they have not
    exited ``KILL_GRACE_SECONDS`` later — a rank blocked in a collective never runs its handler —, and the failed
    rank's exit status is returned (128 + N for a rank killed by signal N). If this process dies, even by SIGKILL,
    the ranks get SIGTERM ([`end_with_the_launcher`]).
    """
    base = {
        **os.environ,
        LAUNCHER_PID_ENV: str(os.getpid()),
        "WORLD_SIZE": str(nproc),
        "LOCAL_WORLD_SIZE": str(nproc),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc))),
    }
    ranks = [subprocess.Popen(command, env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(nproc)]

    def forward(signum, frame):
        for process in ranks:
            if process.poll() is None:
                process.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        failed, kill_at = 0, None
        while any(process.poll() is None for process in ranks):
            codes = [process.poll() for process in ranks]
            if any(code not in (None, 0) for code in codes) and not failed:
                failed = next(code for code in codes if code not in (None, 0))
                kill_at = time.monotonic() + KILL_GRACE_SECONDS
                for process in ranks:
                    if process.poll() is None:
                        process.terminate()
                        process.send_signal(signal.SIGCONT)  # a stopped rank acts on SIGTERM only once continued
            if kill_at is not None and time.monotonic() > kill_at:
                for rank, process in enumerate(ranks):
                    if process.poll() is None:
                        print(
                            f"crate: rank {rank} still running {KILL_GRACE_SECONDS} s after SIGTERM; killed",
                            file=sys.stderr,
                        )
                        process.kill()
                kill_at = None
            time.sleep(0.2)
        return _as_exit_status(failed or max((process.returncode for process in ranks), key=abs))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
