"""`crate pretrain` end to end: 2 processes, gloo, real DeepSpeed ZeRO, real text; exports, resumes, signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "lm" / "crate-tiny.yaml"
SMALL = ["model.preset=null", "model.hidden_size=32", "model.num_hidden_layers=2", "model.num_attention_heads=4",
         "model.max_position_embeddings=64", "data.seq_len=32", "data.shuffle_buffer=8", "train.micro_batch_size=4",
         "train.log_every=5", "train.eval_every=0", "optimizer.warmup_steps=2", "optimizer.lr=1.0e-2",
         "optimizer.min_lr=1.0e-3"]

pytestmark = pytest.mark.slow


def pretrain(output_dir: Path, *overrides: str, nproc: int = 2, config: Path = TINY, timeout: int = 600):
    command = [sys.executable, "-m", "launcher.cli", "pretrain", str(config), f"output_dir={output_dir}", *SMALL,
               *overrides, f"--nproc-per-node={nproc}"]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def train_losses(output_dir: Path) -> list[float]:
    from launcher.metrics import read_metrics

    return [row["loss"] for row in read_metrics(output_dir, kind="train") if "loss" in row]


def exported_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "hf" / "model.safetensors")


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_train_export_and_reload_with_identical_logits(stage, tmp_path):
    result = pretrain(tmp_path, "train.max_steps=20", "train.save_every=20", f"zero.stage={stage}")
    assert result.returncode == 0, result.stderr[-4000:]
    losses = train_losses(tmp_path)
    assert losses[-1] < losses[0] - 1.0, losses

    from transformers import AutoModelForCausalLM

    import crate_lm  # noqa: F401
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    trained = AutoModelForCausalLM.from_config(exported.config).eval()
    state = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "checkpoints"), tag="global_step20")
    trained.load_state_dict(state, strict=False)
    trained.tie_weights()
    ids = torch.randint(0, exported.config.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.equal(exported(ids).logits, trained(ids).logits)


def _ranks_of(parent: int) -> list[int]:
    children = Path(f"/proc/{parent}/task/{parent}/children")
    return [int(pid) for pid in children.read_text().split()] if children.exists() else []


def test_kill_9_of_a_rank_then_relaunch_equals_the_uninterrupted_run(tmp_path):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    run = ("train.max_steps=60", "train.save_every=4", "train.log_every=1")
    assert pretrain(straight, *run).returncode == 0
    command = [sys.executable, "-m", "launcher.cli", "pretrain", str(TINY), f"output_dir={crashed}", *SMALL, *run,
               "--nproc-per-node=2"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (crashed / "checkpoints" / "global_step8").is_dir():
        time.sleep(0.05)
    os.kill(_ranks_of(process.pid)[1], signal.SIGKILL)  # kill -9 one rank mid-run
    _, errors = process.communicate(timeout=300)
    assert process.returncode != 0
    assert not (crashed / "checkpoints" / "global_step60").exists(), "the run finished before the kill"
    second = pretrain(crashed, *run)
    assert second.returncode == 0, second.stderr[-4000:]
    a, b = exported_weights(straight), exported_weights(crashed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert train_losses(crashed)[-20:] == train_losses(straight)[-20:]  # the data neither repeats nor skips


def test_sigterm_saves_exits_zero_and_resumes(tmp_path):
    command = [sys.executable, "-m", "launcher.cli", "pretrain", str(TINY), f"output_dir={tmp_path}", *SMALL,
               "train.max_steps=100000", "train.save_every=0", "--nproc-per-node=2"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and '"loss"' in metrics.read_text()):
        time.sleep(1)
    os.killpg(process.pid, signal.SIGTERM)  # as Slurm does: the whole process group
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-4000:]
    saved = sorted((tmp_path / "checkpoints").glob("global_step*"))
    assert len(saved) == 1
    stopped_at = int(saved[0].name.removeprefix("global_step"))
    resumed = pretrain(tmp_path, f"train.max_steps={stopped_at + 3}", "train.save_every=0")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert (tmp_path / "checkpoints" / f"global_step{stopped_at + 3}").is_dir()


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path):
    assert pretrain(tmp_path, "train.max_steps=10", "train.save_every=5").returncode == 0
    newest = tmp_path / "checkpoints" / "global_step10"
    victim = next(p for p in newest.rglob("*.pt") if p.stat().st_size > 1000)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    resumed = pretrain(tmp_path, "train.max_steps=12", "train.save_every=0")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "global_step10 is unusable (truncated file" in resumed.stderr
    from launcher.metrics import read_metrics

    starts = [row for row in read_metrics(tmp_path, kind="train") if row.get("event") == "start"]
    assert starts[-1]["resumed"] and starts[-1]["step"] == 5


def test_gpt2_baseline_trains_through_the_same_command(tmp_path):
    config = REPO / "configs" / "lm" / "gpt2-tiny.yaml"
    result = pretrain(tmp_path, "train.max_steps=10", "train.save_every=10", config=config)
    assert result.returncode == 0, result.stderr[-4000:]
    assert train_losses(tmp_path)[-1] < train_losses(tmp_path)[0]
    assert (tmp_path / "hf" / "model.safetensors").exists()


@pytest.mark.parametrize("override, message", [
    ("train.micro_batch_size=0", "train.micro_batch_size: Input should be greater than or equal to 1"),
    ("zero.offload_params=true", "zero: offload_params needs ZeRO stage 3"),
    ("data.seq_len=128", "data.seq_len: 128 exceeds the model's max_position_embeddings (64)"),
    ("train.global_batch_size=6", "train.global_batch_size: 6 is not a multiple of train.micro_batch_size (4) x "
                                  "world size (2)"),
])
def test_bad_configs_fail_before_any_process_with_one_line(override, message, tmp_path):
    result = pretrain(tmp_path, "train.max_steps=1", override, timeout=120)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
