"""Gradient accumulation changes nothing but the memory, and bf16 trains, checkpoints and resumes on the CPU.

At 2 ranks, 4 micro-steps of 4 sequences give the same updates as 1 micro-step of 16 (the same global batch of 32,
the same sequences: one logical stream per rank), on every ZeRO stage, within fp32 reduction-order tolerance; an
accumulating run resumed from a checkpoint ends bit for bit where the uninterrupted one does, in fp32 and in bf16.
All the runs share one torchrun (``several_runs_rank.py``): a launch costs more than a tiny run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launcher.metrics.logger import read_metrics
from tests.crate_cli import TINY_CRATE

REPO = Path(__file__).resolve().parents[3]
TINY = REPO / "configs" / "lm" / "crate-tiny.yaml"
SEVERAL_RUNS = Path(__file__).with_name("several_runs_rank.py")
STEPS, RESUME_AT = 4, 2
STAGES = (0, 1, 2, 3)
BF16_STAGES = (0, 2)  # bf16 without ZeRO (DeepSpeed's bf16 optimizer wrapper) and with ZeRO's own

pytestmark = pytest.mark.slow


def accumulating_and_resumed(root: Path, name: str, overrides: list[str]) -> list[dict]:
    """A run with 4 micro-steps per step, and the same run cut back to step ``RESUME_AT`` and resumed."""
    accumulating = root / f"{name}-accumulating"
    return [
        {"output_dir": str(accumulating), "overrides": [*overrides, "train.micro_batch_size=4"]},
        {
            "output_dir": str(root / f"{name}-resumed"),
            "overrides": [*overrides, "train.micro_batch_size=4"],
            "resume_from": str(accumulating),
            "at": RESUME_AT,
        },
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    from launcher.cluster.local import preflight
    from launcher.config.run import load_run_config
    from launcher.models.tokenizers import trained_tokenizer_dir

    root = tmp_path_factory.mktemp("runs")
    common = [
        *TINY_CRATE,
        "data.streams_per_rank=1",  # a rank's 16 sequences of a step are the same for any micro-batch size
        "train.global_batch_size=32",
        f"train.max_steps={STEPS}",
        "train.log_every=1",
        f"train.save_every={RESUME_AT}",
        "train.eval_every=0",
        "train.whitebox_every=0",
        "optimizer.warmup_steps=1",
        "optimizer.lr=1.0e-2",
    ]
    preflight(load_run_config(TINY, [f"output_dir={root / 'tokenizer'}", *common]), 2)
    common.append(f"tokenizer={trained_tokenizer_dir(root / 'tokenizer')}")
    plan = []
    for stage in STAGES:
        plan += accumulating_and_resumed(root, f"zero{stage}", [*common, f"zero.stage={stage}"])
        plan.append(
            {
                "output_dir": str(root / f"zero{stage}-whole"),
                "overrides": [*common, f"zero.stage={stage}", "train.micro_batch_size=16"],
            }
        )
    for stage in BF16_STAGES:
        plan += accumulating_and_resumed(root, f"bf16-zero{stage}", [*common, f"zero.stage={stage}", "precision=bf16"])
    (root / "plan.json").write_text(json.dumps({"config": str(TINY), "runs": plan}))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(SEVERAL_RUNS)]
        + [str(root / "plan.json")],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return root


def losses(output_dir: Path) -> list[float]:
    rows = [row for row in read_metrics(output_dir, kind="train") if "loss" in row and "event" not in row]
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1)), rows
    return [row["loss"] for row in rows]


def start_row(output_dir: Path) -> dict:
    return next(row for row in read_metrics(output_dir, kind="train") if row.get("event") == "start")


def exported(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "hf" / "model.safetensors")


def assert_resumed_bit_for_bit(runs: Path, name: str) -> None:
    accumulating, resumed = runs / f"{name}-accumulating", runs / f"{name}-resumed"
    assert losses(resumed) == losses(accumulating), name
    again, uninterrupted = exported(resumed), exported(accumulating)
    assert all(torch.equal(again[key], uninterrupted[key]) for key in uninterrupted), name


@pytest.mark.parametrize("stage", STAGES)
def test_accumulating_four_micro_steps_equals_one_big_step_and_resumes_exactly(runs, stage):
    accumulating, whole = runs / f"zero{stage}-accumulating", runs / f"zero{stage}-whole"
    start = start_row(accumulating)
    assert start["gradient_accumulation_steps"] == 4 and start["samples_per_step"] == 32
    assert start_row(whole)["gradient_accumulation_steps"] == 1
    assert losses(whole)[-1] < losses(whole)[0] - 0.1  # the updates were real ones

    torch.testing.assert_close(losses(accumulating), losses(whole), rtol=1e-5, atol=1e-6)
    accumulated, big = exported(accumulating), exported(whole)
    assert accumulated.keys() == big.keys()
    for key in big:
        # AdamW divides by sqrt(v): a coordinate whose gradient is nearly zero turns the reduction order's ulps into
        # up to ~1e-4 of the learning rate (1e-2 here).
        torch.testing.assert_close(accumulated[key], big[key], rtol=1e-5, atol=1e-5, msg=key)
    assert_resumed_bit_for_bit(runs, f"zero{stage}")


@pytest.mark.parametrize("stage", BF16_STAGES)
def test_bf16_trains_checkpoints_and_resumes_exactly_on_the_cpu(runs, stage):
    name = f"bf16-zero{stage}"
    assert start_row(runs / f"{name}-accumulating")["precision"] == "bf16"
    bf16_losses, fp32_losses = losses(runs / f"{name}-accumulating"), losses(runs / f"zero{stage}-accumulating")
    assert bf16_losses[-1] < bf16_losses[0] - 0.1
    # bf16 activations (8 bits of mantissa) follow the fp32 run closely on a step this small
    torch.testing.assert_close(bf16_losses, fp32_losses, rtol=2e-2, atol=0.0)
    assert bf16_losses != fp32_losses  # and they really ran in bf16
    assert_resumed_bit_for_bit(runs, name)
