"""Run the ``crate`` command line from tests, as a user would (a subprocess in the repository root)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The smallest CRATE run that still exercises every part (2 layers of d 32 on 32-token blocks): end-to-end tests'
# overrides of configs/lm/crate-tiny.yaml.
TINY_CRATE = (
    "model.preset=null",
    "model.hidden_size=32",
    "model.num_hidden_layers=2",
    "model.num_attention_heads=4",
    "model.max_position_embeddings=64",
    "data.seq_len=32",
    "data.shuffle_buffer=8",
    "train.micro_batch_size=4",
)


def run_crate(
    command: str, config: Path, output_dir: Path, *overrides: str, nproc: int = 1
) -> subprocess.CompletedProcess:
    """``crate COMMAND CONFIG output_dir=... OVERRIDES --nproc-per-node=N``; asserts it succeeds and returns the
    finished process (its console output in ``stdout`` / ``stderr``)."""
    args = [
        sys.executable,
        "-m",
        "launcher.cli",
        command,
        str(config),
        f"output_dir={output_dir}",
        *overrides,
        f"--nproc-per-node={nproc}",
    ]
    result = subprocess.run(args, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def run_rank_script(script: Path, out: Path, config: Path, overrides: tuple[str, ...], nproc: int = 2) -> list[dict]:
    """A run of ``config`` with ``overrides`` on ``nproc`` ranks of ``script`` (a torchrun rank that wraps the loop
    and writes ``out`` with ``.rank{r}`` before the suffix), after the preflight ``crate pretrain`` runs first (the
    tokenizer and the data); asserts it succeeds and returns each rank's JSON, in rank order."""
    from launcher.cluster.local import preflight
    from launcher.config.run import load_run_config

    preflight(load_run_config(config, list(overrides)), nproc)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", str(script)]
        + [str(out), str(config), *overrides],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads(out.with_name(f"{out.stem}.rank{rank}{out.suffix}").read_text()) for rank in range(nproc)]
