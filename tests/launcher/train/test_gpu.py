"""Checks that need a CUDA device (marker ``gpu``; skipped with the reason elsewhere): bf16 training on the device,
the flash attention kernel on the training path, and the out-of-memory error that names the knobs."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from launcher.errors import OutOfMemoryError
from launcher.metrics.logger import read_metrics
from launcher.train.attention import flash_attention_first
from launcher.train.step import memory_knobs_on_oom
from tests.crate_cli import REPO, run_crate
from tests.launcher.train.attention_models import SDPA_MODELS, SEQ_LEN, VOCAB, tiny_text_model

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


def _attention_ops(model, ids) -> set[str]:
    """The SDPA operators (aten names) a training forward and backward in bf16 dispatch to, under the loop's order."""
    with flash_attention_first("cuda"), profile(activities=[ProfilerActivity.CPU]) as profiler:
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    return {event.key for event in profiler.key_averages() if "scaled_dot_product" in event.key}


@pytest.mark.parametrize(("arch", "preset"), SDPA_MODELS)
def test_the_bf16_training_path_runs_the_flash_kernel(arch, preset):
    torch.manual_seed(0)
    model = tiny_text_model(arch, preset).to("cuda", torch.bfloat16)  # DeepSpeed's bf16 holds bf16 weights too
    ids = torch.randint(0, VOCAB, (2, SEQ_LEN), device="cuda")
    ops = _attention_ops(model, ids)
    assert {"aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_flash_attention_backward"} <= ops
    assert not {op for op in ops if "efficient" in op or "cudnn" in op or "math" in op}, ops
    # and flash alone serves it: with every other backend off, the step still runs
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
