"""Checkpoints saved before the fidelity fields existed (their ``config.json`` lacks them) load with today's code
into the same tensors and give the same logits (fixture: ``old_checkpoints.py``)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoModelForImageClassification

import crate_lm  # noqa: F401  (registers the Auto classes)
from tests.crate_lm.old_checkpoints import FIXTURE, deterministic_weights, fixture_input, parameter_shapes

CASES = json.loads(FIXTURE.read_text())["cases"]
NEW_FIELDS = (
    "final_layer_norm",
    "final_layer_norm_eps",
    "layer_norm_bias",
    "mlp_bias",
    "attention_out_projection",
    "ista_dictionary_fan_in",
    "vocab_pad_multiple",
)


@pytest.mark.parametrize("name", sorted(CASES))
def test_old_checkpoint_loads_with_the_same_tensors_and_logits(name, tmp_path):
    case = CASES[name]
    assert not set(NEW_FIELDS) & set(case["config"]), "the fixture must be a config written before the new fields"
    (tmp_path / "config.json").write_text(json.dumps(case["config"]))
    save_file(deterministic_weights(case["parameters"]), str(tmp_path / "model.safetensors"))
    auto = AutoModelForCausalLM if case["task"] == "causal-lm" else AutoModelForImageClassification
    model = auto.from_pretrained(tmp_path).eval()

    assert parameter_shapes(model) == case["parameters"]  # no tensor missing, none extra, same shapes
    with torch.no_grad():
        logits = model(fixture_input(case["task"], model.config)).logits
    torch.testing.assert_close(logits.double(), torch.tensor(case["logits"], dtype=torch.float64), rtol=1e-5, atol=1e-5)
