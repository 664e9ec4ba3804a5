"""Gradient accumulation changes nothing but the memory: at 2 ranks, 4 micro-steps of 4 sequences give the same
updates as 1 micro-step of 16 (the same global batch of 32, the same sequences: one logical stream per rank), on
every ZeRO stage, within fp32 reduction-order tolerance; and an accumulating run resumed from a checkpoint ends
bit for bit where the uninterrupted one does. All runs of a stage share one torchrun (``several_runs_rank.py``)."""

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

pytestmark = pytest.mark.slow


def run_plan(tmp_path: Path, runs: list[dict]) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"config": str(TINY), "runs": runs}))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(SEVERAL_RUNS)]
        + [str(plan)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-4000:]


def losses(output_dir: Path) -> list[float]:
    rows = [row for row in read_metrics(output_dir, kind="train") if "loss" in row and "event" not in row]
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1)), rows
    return [row["loss"] for row in rows]


STAGES = (0, 1, 2, 3)


def test_accumulating_four_micro_steps_equals_one_big_step_and_resumes_exactly_on_every_stage(tmp_path):
    from launcher.cluster.local import preflight
    from launcher.config.run import load_run_config
    from launcher.models.tokenizers import trained_tokenizer_dir

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
    preflight(load_run_config(TINY, [f"output_dir={tmp_path / 'tokenizer'}", *common]), 2)
    common.append(f"tokenizer={trained_tokenizer_dir(tmp_path / 'tokenizer')}")
    runs = []
    for stage in STAGES:
        accumulating = tmp_path / f"zero{stage}-accumulating"
        runs += [
            {
                "output_dir": str(accumulating),
                "overrides": [*common, f"zero.stage={stage}", "train.micro_batch_size=4"],
            },
            {"output_dir": str(tmp_path / f"zero{stage}-whole"), "overrides": [*common, f"zero.stage={stage}"]},
            {
                "output_dir": str(tmp_path / f"zero{stage}-resumed"),
                "overrides": [*common, f"zero.stage={stage}", "train.micro_batch_size=4"],
                "resume_from": str(accumulating),
                "at": RESUME_AT,
            },
        ]
        runs[-2]["overrides"].append("train.micro_batch_size=16")
    run_plan(tmp_path, runs)

    for stage in STAGES:
        accumulating, whole, resumed = (
            tmp_path / f"zero{stage}-{name}" for name in ("accumulating", "whole", "resumed")
        )
        start = next(row for row in read_metrics(accumulating, kind="train") if row.get("event") == "start")
        assert start["gradient_accumulation_steps"] == 4 and start["samples_per_step"] == 32, stage
        assert losses(whole)[-1] < losses(whole)[0] - 0.1, stage  # the updates were real ones

        torch.testing.assert_close(losses(accumulating), losses(whole), rtol=1e-5, atol=1e-6, msg=f"ZeRO-{stage}")
        accumulated, big = (load_file(run / "hf" / "model.safetensors") for run in (accumulating, whole))
        assert accumulated.keys() == big.keys()
        for name in big:
            # AdamW divides by sqrt(v): a coordinate whose gradient is nearly zero turns the reduction order's ulps
            # into up to ~1e-4 of the learning rate (1e-2 here).
            torch.testing.assert_close(accumulated[name], big[name], rtol=1e-5, atol=1e-5, msg=f"ZeRO-{stage} {name}")

        assert losses(resumed) == losses(accumulating), stage
        again = load_file(resumed / "hf" / "model.safetensors")
        assert all(torch.equal(again[name], accumulated[name]) for name in accumulated), stage
