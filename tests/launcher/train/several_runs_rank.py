"""One rank that trains several runs one after another in the same process group, so that a test can compare runs
without paying a process launch (imports, rendezvous, DeepSpeed's op build) for each.

    torchrun --standalone --nproc-per-node 2 tests/launcher/train/several_runs_rank.py PLAN.json

``PLAN.json``: ``{"config": PATH, "runs": [{"output_dir": DIR, "overrides": [...], "resume_from": DIR, "at": K}]}``
(a run may name its own ``"config"``).
A run with ``resume_from`` starts as a copy of that run's directory cut back to its step-``K`` checkpoint (the newer
checkpoints, the later metrics rows and the export removed by rank 0), so it resumes there, as a requeued job does.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch.distributed as dist

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))


def cut_back(source: Path, target: Path, step: int) -> None:
    """``target``: ``source`` as it was right after its step-``step`` checkpoint."""
    from data_pipeline.files import atomic_write
    from launcher.train.checkpoint import TAG_PATTERN, tag_for

    shutil.copytree(source, target)
    shutil.rmtree(target / "hf", ignore_errors=True)
    checkpoints = target / "checkpoints"
    for directory in checkpoints.iterdir():
        match = TAG_PATTERN.match(directory.name)
        if match and int(match.group(1)) > step:
            shutil.rmtree(directory)
    atomic_write(checkpoints / "latest", tag_for(step).encode())


def main() -> int:
    from launcher.cluster.local import pretrain

    plan = json.loads(Path(sys.argv[1]).read_text())
    for run in plan["runs"]:
        if "resume_from" in run:
            if not dist.is_initialized() or dist.get_rank() == 0:
                cut_back(Path(run["resume_from"]), Path(run["output_dir"]), run["at"])
            if dist.is_initialized():
                dist.barrier()
        status = pretrain(run.get("config", plan["config"]), [f"output_dir={run['output_dir']}", *run["overrides"]])
        if status:
            return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
