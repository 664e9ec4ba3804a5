"""What the `crate pretrain` benchmarks share: running the harness in a subprocess and reading its metrics, the
batches it trains on, and the bare PyTorch loop it is measured against (``bench_pretrain.py``, ``bench_gpu.py``).

The bare loop is deliberately minimal — forward, backward, clip, AdamW, zero_grad — on the model the harness builds
(``launcher.models.build``, the same init seed), so that a ratio of the two measures the harness and nothing else.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the project's packages, also from a checkout that is not installed
    sys.path.insert(0, str(REPO))


# A timed run trains and logs, nothing else: evaluation, checkpoints, the white-box probe and the export would only
# be paused out of the throughput anyway, and cost start-up and wall time.
SIDE_JOBS_OFF = ("train.eval_every=0", "train.save_every=0", "train.whitebox_every=0", "train.export_at_end=false")


def timed_run(steps: int, log_every: int) -> list[str]:
    """The overrides of a timed harness run: ``steps`` optimizer steps, metrics every ``log_every``, side jobs off."""
    return [f"train.max_steps={steps}", f"train.log_every={log_every}", *SIDE_JOBS_OFF]


def pretrain(config: str, output_dir: Path, overrides: list[str], nproc: int = 1, repo: Path = REPO) -> list[dict]:
    """Run ``crate pretrain config`` (the real command line, in a subprocess) of the checkout ``repo`` (this one by
    default; an older one measures "before") and return its metrics rows."""
    from launcher.metrics.logger import read_metrics

    if "export_at_end" not in (repo / "launcher" / "config" / "run.py").read_text():  # a checkout from before it
        overrides = [o.replace("train.export_at_end=", "train.export_on_save=") for o in overrides]
    command = [
        sys.executable,
        "-m",
        "launcher.cli",
        "pretrain",
        config,
        f"output_dir={output_dir}",
        *overrides,
        f"--nproc-per-node={nproc}",
    ]
    result = subprocess.run(command, cwd=repo, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"crate pretrain failed:\n{result.stderr[-3000:]}")
    return read_metrics(output_dir)


def harness_step_times(rows: list[dict], warmup: int) -> list[float]:
    """Wall time per step between consecutive logged steps after ``warmup``: everything the harness does (data,
    all-reduces, metrics) included."""
    steps = [(row["step"], row["time"]) for row in rows if row["kind"] == "train" and "loss" in row]
    return [(b[1] - a[1]) / (b[0] - a[0]) for a, b in zip(steps, steps[1:]) if a[0] >= warmup]


def same_batches(config, tokenizer, count: int) -> list[torch.Tensor]:
    """The first ``count`` micro-batches of the run's packed stream, read beforehand (the bare loop's input)."""
    from data_pipeline.text_stream import TextLoader, build_plan

    loader = iter(TextLoader(build_plan(config.data, 1), tokenizer, 0, config.train.micro_batch_size, 0))
    return [next(loader)["input_ids"] for _ in range(count)]


def bare_model_and_optimizer(config, tokenizer, device: torch.device, fused: bool = False):
    """The run's model (built as the harness builds it, same seed) on ``device``, train mode, and torch's AdamW
    over the harness's decay groups with the run's settings (``fused``: the single-kernel CUDA AdamW)."""
    from launcher.models.build import build_model, build_model_config, parameter_groups

    model_config = build_model_config(config.model, len(tokenizer), tokenizer.eos_token_id, config.data.seq_len)
    torch.manual_seed(config.train.seed)
    model = build_model(model_config).to(device).train()
    opt = config.optimizer
    optimizer = torch.optim.AdamW(
        parameter_groups(model, opt.weight_decay), lr=opt.lr, betas=opt.betas, eps=opt.eps, fused=fused
    )
    return model, optimizer


def bare_step(
    model,
    optimizer,
    batch: torch.Tensor | list[torch.Tensor],
    grad_clip: float,
    autocast_dtype: torch.dtype | None = None,
):
    """One bare training step: forward (under autocast to ``autocast_dtype`` if given) and backward of each
    micro-batch (``batch``: one, or a list to accumulate over, each loss scaled by 1/len as DeepSpeed scales it), clip,
    AdamW, zero_grad. Returns the last loss, a tensor on the device (reading it is the caller's choice: a host sync)."""
    micro_batches = batch if isinstance(batch, list) else [batch]
    device_type = micro_batches[0].device.type
    for micro in micro_batches:
        with torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext():
            loss = model(input_ids=micro, labels=micro, use_cache=False).loss
        (loss / len(micro_batches)).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()
