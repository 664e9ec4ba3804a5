"""``train.flops_budget`` in a sweep: the max_steps that spend the budget, from the registry's FLOP formula, so that
an IsoFLOP grid is a sweep; one-line errors for the cases it cannot size."""

from __future__ import annotations

import pytest
import yaml

from launcher.architectures.registry import training_flops_per_token
from launcher.cluster.sweep import load_sweep, run_config
from launcher.errors import ConfigError
from launcher.models.build import build_model_config
from tests.crate_cli import REPO

LM = REPO / "configs" / "lm"


def sweep_file(tmp_path, budget_axis: dict, overrides: dict | None = None):
    body = {
        "name": "isoflop",
        "output_root": str(tmp_path / "runs"),
        "config": str(LM / "gpt2-tiny.yaml"),
        "overrides": {"train.global_batch_size": 16, **(overrides or {})},
        "axes": {
            "size": {"s": {"model.hidden_size": 64}, "m": {"model.hidden_size": 128}},
            "budget": budget_axis,
        },
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def test_each_run_gets_the_steps_that_spend_its_budget(tmp_path):
    sweep = load_sweep(sweep_file(tmp_path, {"c1": {"train.flops_budget": 1.0e13}, "c3": {"train.flops_budget": 3e13}}))
    steps = {}
    for run in sweep.runs:
        config = run_config(run)
        model = build_model_config(config.model, 4096, 0, config.data.seq_len)
        tokens_per_step = 16 * config.data.seq_len
        spent = (
            config.train.max_steps
            * tokens_per_step
            * training_flops_per_token(model, config.data.seq_len, tokens_per_step)
        )
        assert spent == pytest.approx({"c1": 1e13, "c3": 3e13}[run.labels["budget"]], rel=0.01)
        assert run.overrides[-1].startswith("output_dir=") and not any("flops_budget" in o for o in run.overrides)
        steps[run.name] = config.train.max_steps
    assert steps["s-c1"] > 2 * steps["m-c1"]  # the smaller model trains on more tokens for the same compute
    assert steps["s-c3"] == pytest.approx(3 * steps["s-c1"], abs=1)


def test_what_a_budget_cannot_size_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"run s-c1: set train.flops_budget or train.max_steps, not both"):
        load_sweep(sweep_file(tmp_path, {"c1": {"train.flops_budget": 1e13, "train.max_steps": 5}}))
    with pytest.raises(ConfigError, match=r"run s-c1: train.flops_budget: expected a positive number of FLOPs"):
        load_sweep(sweep_file(tmp_path, {"c1": {"train.flops_budget": "lots"}}))
    path = sweep_file(tmp_path, {"c1": {"train.flops_budget": 1e13}})
    path.write_text(path.read_text().replace("train.global_batch_size: 16", "train.log_every: 10"))
    with pytest.raises(ConfigError, match=r"run s-c1: train.flops_budget: needs train.global_batch_size"):
        load_sweep(path)


def test_an_architecture_without_a_formula_is_counted_as_the_loop_counts_it(tmp_path):
    """Llama has no FLOP formula: its FLOPs per token are counted by torch's counter on one sequence: 6N for the
    weights (LM head included) plus the attention scores, which the CPU attention kernel's registration adds (torch
    counts them as 2 batched matmuls forward and 5 backward)."""
    from launcher.cluster.budget import counted_flops_per_token

    sweep = load_sweep(sweep_file(tmp_path, {"c1": {"train.flops_budget": 1e13}}, {"model.arch": "llama"}))
    config = run_config(sweep.runs[1])  # d 128
    model = build_model_config(config.model, 4096, 0, config.data.seq_len)
    counted = counted_flops_per_token(model, config.data.seq_len)
    non_embedding = 4 * (4 * 128 * 128 + 3 * 128 * model.intermediate_size)
    six_n = 6 * (non_embedding + 128 * 4096)  # + the LM head
    seq_len = config.data.seq_len
    attention = 4 * (4 * seq_len * 128) * 7 / 2  # 4 layers x (QK^T + AV: 4 T d a token) x (1 + 5/2)
    assert counted == six_n + attention
    assert config.train.max_steps == round(1e13 / (counted * 16 * config.data.seq_len))
