"""DeepSpeed JSON generated from the run config, the user override file, precision, and the LR schedule."""

import copy
import json

import pytest

from launcher.config.run import apply_overrides, parse_run_config
from launcher.errors import ConfigError
from launcher.train.engine import deepspeed_config, learning_rate, resolve_precision

BASE = {
    "output_dir": "/tmp/run",
    "data": {"sources": [{"builtin": "shakespeare"}], "seq_len": 64},
    "train": {"max_steps": 100, "micro_batch_size": 4, "global_batch_size": 16},
}


def config(*overrides):
    return parse_run_config(apply_overrides(copy.deepcopy(BASE), list(overrides)), "run.yaml")


def test_generated_json_carries_batch_zero_offload_and_clipping():
    ds = deepspeed_config(
        config("zero.stage=3", "zero.offload_optimizer=true", "zero.offload_params=true", "optimizer.grad_clip=0.5"),
        world_size=2,
        device_type="cpu",
    )
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 16 and ds["gradient_clipping"] == 0.5
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_optimizer"] == {"device": "cpu"}
    assert zero["offload_param"] == {"device": "cpu"}
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["betas"] == [0.9, 0.95]
    assert ds["optimizer"]["params"]["torch_adam"]  # bit-exact resume on the CPU (launcher/train/engine.py)
    assert ds["bf16"]["enabled"] is False and ds["bf16"]["check_grad_overflow"]


def test_user_json_overrides_generated_keys(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 1000}, "gradient_clipping": 2.0}))
    ds = deepspeed_config(config("zero.stage=2", f"deepspeed_config={user}"), 1, "cpu")
    assert ds["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1000} and ds["gradient_clipping"] == 2.0
    user.write_text("{oops")
    with pytest.raises(ConfigError, match="deepspeed_config: .* is not valid JSON"):
        deepspeed_config(config(f"deepspeed_config={user}"), 1, "cpu")


def test_precision_is_bf16_on_accelerators_fp32_on_cpu():
    assert resolve_precision(config(), "cpu") == "fp32" and resolve_precision(config(), "cuda") == "bf16"
    assert resolve_precision(config("precision=bf16"), "cpu") == "bf16"  # asked for: trains (test_accumulation.py)
    assert deepspeed_config(config("precision=bf16"), 1, "cpu")["bf16"]["enabled"]


def test_warmup_then_cosine_to_min_lr():
    optimizer = config("optimizer.warmup_steps=10", "optimizer.lr=1.0e-3", "optimizer.min_lr=1.0e-4").optimizer
    rates = [learning_rate(step, optimizer, 100) for step in range(101)]
    assert rates[0] == pytest.approx(1e-4) and rates[9] == pytest.approx(1e-3)
    assert rates[10] == pytest.approx(1e-3) and rates[100] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(rates[10:], rates[11:]))
    assert rates[55] == pytest.approx(5.5e-4)
