"""Checks that need a CUDA device (marker ``gpu``; skipped with the reason elsewhere): bf16 training on the device
and the out-of-memory error that names the knobs."""

import pytest
import torch

from launcher.errors import OutOfMemoryError
from launcher.metrics.logger import read_metrics
from launcher.train.step import memory_knobs_on_oom
from tests.crate_cli import REPO, run_crate

pytestmark = pytest.mark.gpu


def test_device_out_of_memory_names_the_knobs():
    knobs = "out of memory during step 7 .*train.micro_batch_size"
    with pytest.raises(OutOfMemoryError, match=knobs) as info, memory_knobs_on_oom("step 7"):
        torch.empty(1 << 50, dtype=torch.uint8, device="cuda")  # a petabyte
    assert isinstance(info.value.__cause__, torch.OutOfMemoryError)


def test_bf16_pretraining_on_the_device_logs_mfu_against_the_device_peak(tmp_path):
    run_crate(
        "pretrain",
        REPO / "configs" / "lm" / "crate-tiny.yaml",
        tmp_path,
        "tokenizer=gpt2",
        "train.max_steps=20",
        "train.log_every=5",
        "train.eval_every=0",
        "train.whitebox_every=0",
        "train.save_every=20",
        "precision=bf16",
        "zero.stage=2",
    )
    start = next(row for row in read_metrics(tmp_path, "train") if row.get("event") == "start")
    assert start["precision"] == "bf16" and "table" in start["peak_source"]
    rows = [row for row in read_metrics(tmp_path, "train") if "mfu" in row]
    assert rows and 0 < rows[-1]["mfu"] < 1
