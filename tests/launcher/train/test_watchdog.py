"""The progress watchdog on its own, in a real process: silence past the timeout ends the process with one line and
``HUNG_EXIT_CODE``; regular pets keep it alive. (The 2-rank runs with a stopped rank are in test_pretrain.py.)"""

import subprocess
import sys
import textwrap
import time
from pathlib import Path

from launcher.train.watchdog import HUNG_EXIT_CODE

REPO = Path(__file__).resolve().parents[3]


def run_python(code: str) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    return result, time.monotonic() - started


def test_no_progress_past_the_timeout_ends_the_process_with_one_line():
    result, took = run_python(
        """
        import time
        from launcher.train.watchdog import Watchdog

        with Watchdog(0.01, rank=3) as watchdog:  # 0.6 s
            watchdog.pet("the checkpoint save", 7)
            time.sleep(60)  # a collective that never returns
        """
    )
    assert result.returncode == HUNG_EXIT_CODE, result.stderr
    assert result.stderr.strip() == (
        "rank 3: no progress for 0.01 min in the checkpoint save (step 7); a rank is hung or dead - stopping "
        "(train.collective_timeout_minutes)"
    )
    assert took < 30


def test_progress_keeps_the_process_alive_and_the_block_ends_the_thread():
    result, _ = run_python(
        """
        import threading, time
        from launcher.train.watchdog import Watchdog

        with Watchdog(0.01, rank=0) as watchdog:  # 0.6 s, petted every 0.1 s for 1.2 s
            for step in range(12):
                watchdog.pet("the optimizer step", step)
                time.sleep(0.1)
        assert threading.active_count() == 1
        time.sleep(0.8)  # past the timeout after the block: nothing watches any more
        print("done")
        """
    )
    assert result.returncode == 0 and result.stdout.strip() == "done", result.stderr
