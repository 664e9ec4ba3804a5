"""The hot path's budget, counted in a real 2-rank run (gloo, real DeepSpeed, accumulation 4): outside logging and
stop-check steps the harness issues no collective and reads the device at most once per optimizer step (ZeRO-0's
gradient-norm check; ZeRO 1-3 make theirs inside DeepSpeed), and the CRATE forward none at all.

The counting rank (``counted_rank.py``) wraps every torch.distributed collective and every host read of a tensor
(``item``, ``tolist``, ``bool``, ``float``, ``int``, ``numpy``) and attributes each to its caller.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.crate_cli import TINY_CRATE, run_rank_script

REPO = Path(__file__).resolve().parents[3]
TINY = REPO / "configs" / "lm" / "crate-tiny.yaml"
COUNTED_RANK = Path(__file__).with_name("counted_rank.py")
STEPS, LOG_EVERY, STOP_CHECK_EVERY = 14, 7, 5

pytestmark = pytest.mark.slow


def counted_run(tmp_path: Path, *overrides: str) -> list[list[dict]]:
    """Per rank, per optimizer step: the collectives and host reads, by caller."""
    overrides = (
        f"output_dir={tmp_path / 'run'}",
        *TINY_CRATE,
        "train.global_batch_size=32",  # 4 micro-steps per step on 2 ranks
        f"train.max_steps={STEPS}",
        f"train.log_every={LOG_EVERY}",
        f"train.stop_check_every={STOP_CHECK_EVERY}",
        "train.eval_every=0",
        "train.whitebox_every=0",
        "train.save_every=0",
        *overrides,
    )
    return [rank["steps"] for rank in run_rank_script(COUNTED_RANK, tmp_path / "counts.json", TINY, overrides)]


def quiet(step: int) -> bool:
    """Neither a logging step nor a stop check, nor the first two (the model-state probe) or the last (the save)."""
    return 2 < step < STEPS and step % LOG_EVERY and step % STOP_CHECK_EVERY


def total(counts: dict) -> int:
    return sum(counts.values())


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_no_collective_and_at_most_one_host_read_per_step_outside_logging_steps(stage, tmp_path):
    ranks = counted_run(tmp_path, f"zero.stage={stage}")
    for steps in ranks:
        assert len(steps) == STEPS
        for step, counts in enumerate(steps, start=1):
            ours_collectives = counts["collectives"].get("ours", {})
            ours_reads = counts["host_reads"].get("ours", {})
            if quiet(step):
                assert ours_collectives == {}, (step, counts)
                assert total(ours_reads) <= (1 if stage == 0 else 0), (step, counts)
            elif step % STOP_CHECK_EVERY == 0 and step % LOG_EVERY and step != STEPS:
                assert total(ours_collectives) == 1, (step, counts)  # the stop check alone
            # the model (CRATE, ours) and HF never read the device during a step
            assert "transformers" not in counts["host_reads"], (step, counts)
    # DeepSpeed's own per-step reads, for the record (its overflow check at ZeRO 1-3)
    print({step: counts["host_reads"].get("deepspeed") for step, counts in enumerate(ranks[0], 1) if quiet(step)})
