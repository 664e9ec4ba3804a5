"""The local spawner's process tree, with real processes as ranks (small Python scripts, so it takes seconds): a rank
that ignores SIGTERM after another failed is killed, and the ranks end when the launcher dies, even by SIGKILL.
(The same with real training runs: tests/launcher/train/test_pretrain.py.)"""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from launcher.cluster import processes
from launcher.cluster.processes import LAUNCHER_PID_ENV, spawn_local
from tests.processes import ended, wait_for

REPO = Path(__file__).resolve().parents[3]


def test_a_rank_that_ignores_sigterm_after_another_was_killed_is_killed(tmp_path, monkeypatch, capsys):
    """Like a rank blocked in a collective, whose SIGTERM handler never runs."""
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(processes, "KILL_GRACE_SECONDS", 1)
    monkeypatch.setenv("READY", str(tmp_path / "ready"))
    rank = """
        import os, signal, time
        if os.environ["RANK"] == "1":
            while not os.path.exists(os.environ["READY"]):
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGKILL)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        open(os.environ["READY"], "w").close()
        time.sleep(60)
    """
    started = time.monotonic()
    assert spawn_local([sys.executable, "-c", textwrap.dedent(rank)], 2) == 128 + signal.SIGKILL  # as a shell says
    assert time.monotonic() - started < 30
    assert "crate: rank 0 still running 1 s after SIGTERM; killed" in capsys.readouterr().err


def test_the_ranks_end_when_the_launcher_is_killed(tmp_path):
    rank = """
        import os, time
        from launcher.cluster.processes import end_with_the_launcher

        end_with_the_launcher()
        with open(os.path.join(os.environ["READY_DIR"], os.environ["RANK"]), "w") as ready:
            ready.write(str(os.getpid()))
        time.sleep(60)
    """
    launcher = f"""
        import sys
        from launcher.cluster.processes import spawn_local

        sys.exit(spawn_local([sys.executable, "-c", {textwrap.dedent(rank)!r}], 2))
    """
    process = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(launcher)], cwd=REPO, env={**os.environ, "READY_DIR": str(tmp_path)}
    )
    try:
        assert wait_for(lambda: len(list(tmp_path.iterdir())) == 2, 60)
        ranks = [int((tmp_path / name).read_text()) for name in ("0", "1")]
        process.kill()
        process.wait()
        assert wait_for(lambda: all(ended(pid) for pid in ranks), 5)
    finally:
        process.kill()
        for pid in (int(path.read_text() or 0) for path in tmp_path.iterdir()):
            if pid and not ended(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_rank_whose_launcher_died_before_it_started_stops_at_once():
    """The parent-death signal is set by the rank itself: if the launcher was gone by then, it never comes."""
    rank = "from launcher.cluster.processes import end_with_the_launcher; end_with_the_launcher(); print('alive')"
    result = subprocess.run(
        [sys.executable, "-c", rank],
        cwd=REPO,
        env={**os.environ, LAUNCHER_PID_ENV: "1"},  # not this process's parent: the launcher it names is gone
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == -signal.SIGTERM and "alive" not in result.stdout, result
