"""Elastic resume: a run stopped on 2 ranks resumes on 1, and one stopped on 1 resumes on 2, on ZeRO 0-3, as if it
had never stopped — the same global batch at every step (a fingerprint of its rows), the same losses (1e-4) and the
same final weights (1e-5 relative: the reduction order differs). Runs started fresh at 1 and 2 ranks read the same
batches too (a fixed number of logical streams). The same for an image run with mixup (ZeRO-2) and a bf16 run
(2 -> 1), and a changed global batch continues from the samples consumed with a log row.

Three launches of ``several_runs_rank.py`` (1 rank, 2 ranks, 1 rank) train everything: a launch costs more than a
tiny run."""

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
VISION = REPO / "configs" / "vision" / "crate-fmnist.yaml"
SEVERAL_RUNS = Path(__file__).with_name("several_runs_rank.py")
STEPS, RESUME_AT = 4, 2
STAGES = (0, 1, 2, 3)

pytestmark = pytest.mark.slow

COMMON = [
    f"train.max_steps={STEPS}",
    "train.log_every=1",
    f"train.save_every={RESUME_AT}",
    "train.whitebox_every=0",
    "train.batch_fingerprints=true",
    "optimizer.warmup_steps=1",
    "optimizer.lr=1.0e-2",
]
# 4 micro-batches of 4 a step; the validation set the same at any world size
TEXT = [
    *TINY_CRATE,
    *COMMON,
    f"train.eval_every={STEPS}",
    "data.num_streams=2",
    "train.global_batch_size=16",
    "train.eval_samples=16",
]
IMAGES = [
    *COMMON,
    "train.eval_every=0",
    "model.preset=crate-vision-test",
    "data.num_streams=2",
    "data.shuffle_buffer=64",
    "train.micro_batch_size=8",
    "train.global_batch_size=32",
    "train.mixup_alpha=0.4",
    "train.label_smoothing=0.1",
    "zero.stage=2",
]


def launch(root: Path, name: str, nproc: int, runs: list[dict]) -> None:
    plan = root / f"{name}.json"
    plan.write_text(json.dumps({"config": str(TINY), "runs": runs}))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", str(SEVERAL_RUNS)]
        + [str(plan)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-4000:]


def resumed(root: Path, name: str, source: str, overrides: list[str], config: Path = TINY) -> dict:
    return {
        "config": str(config),
        "output_dir": str(root / name),
        "overrides": overrides,
        "resume_from": str(root / source),
        "at": RESUME_AT,
    }


def fresh(root: Path, name: str, overrides: list[str], config: Path = TINY) -> dict:
    return {"config": str(config), "output_dir": str(root / name), "overrides": overrides}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    from launcher.cluster.local import preflight
    from launcher.config.run import load_run_config
    from launcher.models.tokenizers import trained_tokenizer_dir

    root = tmp_path_factory.mktemp("elastic")
    preflight(load_run_config(TINY, [f"output_dir={root / 'tokenizer'}", *TEXT]), 2)
    preflight(load_run_config(VISION, [f"output_dir={root / 'vision-preflight'}", *IMAGES]), 2)
    text = [*TEXT, f"tokenizer={trained_tokenizer_dir(root / 'tokenizer')}"]
    stages = {stage: [*text, f"zero.stage={stage}"] for stage in STAGES}
    launch(
        root,
        "one-rank",
        1,
        [fresh(root, f"zero{s}-w1", stages[s]) for s in STAGES] + [fresh(root, "images-w1", IMAGES, VISION)],
    )
    launch(
        root,
        "two-ranks",
        2,
        [
            run
            for s in STAGES
            for run in (fresh(root, f"zero{s}-w2", stages[s]), resumed(root, f"zero{s}-1to2", f"zero{s}-w1", stages[s]))
        ]
        + [
            fresh(root, "images-w2", IMAGES, VISION),
            resumed(root, "images-1to2", "images-w1", IMAGES, VISION),
            fresh(root, "bf16-w2", [*stages[2], "precision=bf16"]),
        ],
    )
    launch(
        root,
        "one-rank-again",
        1,
        [resumed(root, f"zero{s}-2to1", f"zero{s}-w2", stages[s]) for s in STAGES]
        + [
            resumed(root, "images-2to1", "images-w2", IMAGES, VISION),
            resumed(root, "bf16-2to1", "bf16-w2", [*stages[2], "precision=bf16"]),
            # a global batch of 8 instead of 16: half the steps' samples, continuing from those consumed (from the
            # 2-rank checkpoint that zero2-2to1 converted: its universal conversion is reused)
            resumed(root, "zero2-2to1-half-batch", "zero2-2to1", [*stages[2], "train.global_batch_size=8"]),
        ],
    )
    return root


def rows(output_dir: Path, key: str) -> dict[int, object]:
    found = {row["step"]: row[key] for row in read_metrics(output_dir, kind="train") if key in row}
    assert sorted(found) == list(range(1, STEPS + 1)), (output_dir, found)
    return found


def losses(output_dir: Path) -> list[float]:
    return list(rows(output_dir, "loss").values())


def fingerprints(output_dir: Path) -> dict[int, str]:
    return rows(output_dir, "batch_fingerprint")


def validation_loss(output_dir: Path) -> float:
    (row,) = [row for row in read_metrics(output_dir, kind="eval") if row["step"] == STEPS]
    return row["loss"]


def start_row(output_dir: Path) -> dict:
    return [row for row in read_metrics(output_dir, kind="train") if row.get("event") == "start"][-1]


def assert_same_weights(a: Path, b: Path) -> None:
    first, second = load_file(a / "hf" / "model.safetensors"), load_file(b / "hf" / "model.safetensors")
    assert first.keys() == second.keys()
    for key in first:
        # AdamW divides by sqrt(v): a coordinate whose gradient is nearly zero turns the reduction order's ulps into
        # up to ~1e-4 of the learning rate (1e-2 here).
        torch.testing.assert_close(first[key], second[key], rtol=1e-5, atol=1e-5, msg=key)


@pytest.mark.parametrize("stage", STAGES)
def test_a_run_resumed_on_another_world_size_continues_as_if_uninterrupted(runs, stage):
    one, two = runs / f"zero{stage}-w1", runs / f"zero{stage}-w2"
    assert start_row(one)["gradient_accumulation_steps"] == 4 and start_row(two)["gradient_accumulation_steps"] == 2
    assert fingerprints(one) == fingerprints(two)  # fresh runs at 1 and 2 ranks read the same global batches
    assert len(set(fingerprints(two).values())) == STEPS
    for elastic, uninterrupted, saved_world in ((f"zero{stage}-2to1", two, 2), (f"zero{stage}-1to2", one, 1)):
        start = start_row(runs / elastic)
        assert start["resumed_from_world_size"] == saved_world and start["samples_per_step"] == 16, elastic
        assert fingerprints(runs / elastic) == fingerprints(uninterrupted), elastic
        torch.testing.assert_close(losses(runs / elastic), losses(uninterrupted), rtol=1e-4, atol=0.0)
        assert_same_weights(runs / elastic, uninterrupted)
        # the validation set is the same too: the final validation loss agrees
        torch.testing.assert_close(validation_loss(runs / elastic), validation_loss(uninterrupted), rtol=1e-4, atol=0)
    converted = runs / f"zero{stage}-2to1" / "checkpoints" / f"global_step{RESUME_AT}" / "universal"
    assert converted.is_dir() == (stage > 0)  # ZeRO's partitions went through DeepSpeed's universal checkpoint


def test_an_image_run_with_mixup_resumes_on_another_world_size(runs):
    one, two = runs / "images-w1", runs / "images-w2"
    assert fingerprints(one) == fingerprints(two)
    for elastic, uninterrupted, accumulation in (("images-2to1", two, 4), ("images-1to2", one, 2)):
        assert start_row(runs / elastic)["gradient_accumulation_steps"] == accumulation
        assert fingerprints(runs / elastic) == fingerprints(uninterrupted)
        torch.testing.assert_close(losses(runs / elastic), losses(uninterrupted), rtol=1e-4, atol=0.0)
        assert_same_weights(runs / elastic, uninterrupted)


def test_a_bf16_run_resumes_on_another_world_size(runs):
    """The GPU recipes' precision (ZeRO-2's bf16 path, fp32 master weights): the same batches, the losses to 1e-4
    (4e-6 measured), and the exported bf16 weights within one bf16 rounding (2^-8 relative) of the uninterrupted
    run's."""
    elastic, uninterrupted = runs / "bf16-2to1", runs / "bf16-w2"
    assert start_row(elastic)["precision"] == "bf16" and start_row(elastic)["resumed_from_world_size"] == 2
    assert fingerprints(elastic) == fingerprints(uninterrupted)
    torch.testing.assert_close(losses(elastic), losses(uninterrupted), rtol=1e-4, atol=0.0)
    first, second = (
        load_file(elastic / "hf" / "model.safetensors"),
        load_file(uninterrupted / "hf" / "model.safetensors"),
    )
    for key in first:
        scale = second[key].float().abs().max()
        assert (first[key].float() - second[key].float()).abs().max() <= 2**-7 * scale, key


def test_a_changed_global_batch_continues_from_the_samples_consumed(runs):
    halved, uninterrupted = runs / "zero2-2to1-half-batch", runs / "zero2-w2"
    changed = [row for row in read_metrics(halved, kind="train") if row.get("event") == "global_batch_changed"]
    assert len(changed) == 1 and changed[0]["step"] == RESUME_AT
    assert changed[0]["previous_global_batch"] == 16 and changed[0]["global_batch"] == 8
    assert changed[0]["samples_seen"] == 32
    tokens = rows(halved, "tokens")
    assert tokens[RESUME_AT + 1] == (32 + 8) * 32 and tokens[STEPS] == (32 + 16) * 32
    # the first 2 steps are the uninterrupted run's (the next 2 share its step 3's rows between them)
    assert list(fingerprints(halved).values())[:RESUME_AT] == list(fingerprints(uninterrupted).values())[:RESUME_AT]
    assert start_row(halved)["samples_per_step"] == 8
    manifest = json.loads((halved / "checkpoints" / f"global_step{STEPS}" / "manifest.json").read_text())
    assert manifest["samples_seen"] == 48 and manifest["global_batch_size"] == 8
