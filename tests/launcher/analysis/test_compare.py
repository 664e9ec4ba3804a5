"""``crate compare`` on two tiny real runs (CRATE and GPT-2, the same data and recipe): the report with every figure,
the summary table and the white-box section; a sweep root stands for its runs, labelled by its axes."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tests.crate_cli import REPO, TINY_CRATE, run_crate

pytestmark = pytest.mark.slow

TINY = [
    *TINY_CRATE,
    "train.max_steps=20",
    "train.log_every=5",
    "train.eval_every=10",
    "train.eval_batches=2",
    "train.save_every=20",
    "train.whitebox_every=10",
    "optimizer.warmup_steps=2",
    "zero.stage=0",
]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    from launcher.config.run import load_run_config
    from launcher.models.tokenizers import prepare_tokenizer, trained_tokenizer_dir

    root = tmp_path_factory.mktemp("compare")
    config = REPO / "configs" / "lm" / "crate-tiny.yaml"
    prepare_tokenizer("bpe:512", root / "tok", load_run_config(config).data)
    tokenizer = f"tokenizer={trained_tokenizer_dir(root / 'tok')}"
    run_crate("pretrain", config, root / "crate", *TINY, tokenizer)
    run_crate("pretrain", REPO / "configs" / "lm" / "gpt2-tiny.yaml", root / "gpt2", *TINY, tokenizer)
    return root


def test_compare_writes_the_report_with_every_figure(two_runs, tmp_path):
    out = tmp_path / "report"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "launcher.cli",
            "compare",
            str(two_runs / "crate"),
            str(two_runs / "gpt2"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = (out / "report.md").read_text()
    for figure in (
        "loss_vs_tokens.png",
        "loss_vs_params.png",
        "loss_vs_flops.png",
        "throughput_memory.png",
        "whitebox_layers.png",
    ):
        assert (out / figure).stat().st_size > 10_000 and f"({figure})" in report, figure
    rows = {
        line.split("|")[1].strip(): line
        for line in report.splitlines()
        if line.startswith("| crate |") or line.startswith("| gpt2 |")
    }
    assert set(rows) == {"crate", "gpt2"} and "| crate | crate |" in report and "| gpt2 | gpt2 |" in report
    summary = {run["name"]: run for run in json.loads((out / "summary.json").read_text())}
    crate, gpt2 = summary["crate"], summary["gpt2"]
    assert crate["steps"] == gpt2["steps"] == 20 and crate["tokens"] == gpt2["tokens"] == 20 * 4 * 32
    assert crate["non_embedding_params"] < gpt2["non_embedding_params"]  # no MLP: 3d^2 + LNs vs 12d^2 per layer
    assert crate["flops"] > 0 and gpt2["flops"] > 0 and crate["eval"]["loss"] > 0
    assert [row["layer"] for row in crate["whitebox"]] == [0, 1] and len(gpt2["whitebox"]) == 2
    assert "R^c first → last" in report and result.stdout.startswith("# Comparison report")
    # the unigram bar: the entropy of the very tokens evaluated on (2 batches x 4 blocks x 32), counted here afresh
    from collections import Counter

    from launcher.config.run import load_run_config
    from launcher.models.tokenizers import load_tokenizer
    from launcher.train.tasks import fixed_blocks, held_out_spec

    config = load_run_config(two_runs / "crate" / "config.yaml")
    blocks = fixed_blocks(held_out_spec(config), load_tokenizer(config.tokenizer), 8)
    counts = Counter(blocks.flatten().tolist())
    entropy = -sum(c / 256 * math.log(c / 256) for c in counts.values())
    assert sum(counts.values()) == 256
    assert crate["unigram_entropy"] == pytest.approx(entropy) == gpt2["unigram_entropy"]
    (summary_row,) = [line for line in report.splitlines() if line.startswith("| crate | crate |")]
    assert f"| {entropy - crate['eval']['loss']:.3f} (of {entropy:.3f}) |" in summary_row


def test_a_sweep_root_stands_for_its_runs_with_its_labels(two_runs, tmp_path):
    from launcher.analysis.compare import collect_runs

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "sweep.json").write_text(
        json.dumps(
            {
                "name": "x",
                "command": "pretrain",
                "runs": [
                    {"name": name, "labels": {"arch": f"{name}-family"}, "output_dir": str(two_runs / name)}
                    for name in ("crate", "gpt2")
                ],
            }
        )
    )
    runs = collect_runs([sweep])
    assert [(run.name, run.family) for run in runs] == [("crate", "crate-family"), ("gpt2", "gpt2-family")]
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        collect_runs([tmp_path])


def test_best_over_keeps_each_groups_lowest_eval_loss_and_reports_every_candidate(two_runs, tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    # one group ("tiny") tuned over "lr": the two real runs stand for its two candidates
    (sweep / "sweep.json").write_text(
        json.dumps(
            {
                "name": "x",
                "command": "pretrain",
                "runs": [
                    {"name": f"tiny-{lr}", "labels": {"size": "tiny", "lr": lr}, "output_dir": str(two_runs / name)}
                    for name, lr in (("crate", "lr1"), ("gpt2", "lr2"))
                ],
            }
        )
    )
    out = tmp_path / "report"
    result = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "compare", str(sweep), "--best-over", "lr", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    tuning = json.loads((out / "tuning.json").read_text())
    assert len(summary) == 1 and tuning[0]["group"] == "tiny" and set(tuning[0]["candidates"]) == {"lr1", "lr2"}
    assert summary[0]["eval"]["loss"] == min(tuning[0]["candidates"].values())
    assert summary[0]["name"] == tuning[0]["chosen"] and "| tiny | " in (out / "report.md").read_text()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "launcher.cli",
            "compare",
            str(two_runs / "crate"),
            "--best-over",
            "lr",
            "--out",
            str(tmp_path / "refused"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert result.returncode != 0 and "run crate has no label 'lr'" in result.stderr
