"""Models built from run configs: CRATE presets and knobs, the GPT-2 baseline at the same knobs, decay groups."""

import pytest
from transformers import GPT2LMHeadModel

from crate_lm import CrateForCausalLM
from launcher.config.run import ModelSection
from launcher.errors import ConfigError
from launcher.models.build import build_model, build_model_config, parameter_groups


def test_crate_preset_with_knobs_and_tokenizer_vocabulary():
    config = build_model_config(
        ModelSection(preset="crate-tiny", num_hidden_layers=2, overrides={"ista_lambda": 0.2}), 1000, 0, seq_len=128
    )
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (128, 2, 1000)
    assert config.ista_lambda == 0.2 and config.eos_token_id == 0
    assert isinstance(build_model(config), CrateForCausalLM)


def test_gpt2_baseline_from_the_same_knobs_without_dropout():
    section = ModelSection(
        arch="gpt2", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256
    )
    config = build_model_config(section, 1000, 0, seq_len=128)
    assert (config.n_embd, config.n_layer, config.n_head, config.vocab_size) == (64, 2, 4, 1000)
    assert config.resid_pdrop == config.attn_pdrop == config.embd_pdrop == 0.0
    assert isinstance(build_model(config), GPT2LMHeadModel)


def test_config_path_is_read(tmp_path):
    build_model_config(ModelSection(preset="crate-test"), 512, 0, 32).save_pretrained(tmp_path)
    config = build_model_config(ModelSection(config_path=str(tmp_path / "config.json")), 999, 0, 32)
    assert config.hidden_size == 32 and config.vocab_size == 999


@pytest.mark.parametrize(
    "section, seq_len, message",
    [
        (ModelSection(overrides={"colour": 1}), 64, "model.overrides.colour: not a CrateConfig field"),
        (ModelSection(hidden_size=30, num_attention_heads=4), 64, "model: CrateConfig.hidden_size=30 is invalid"),
        (ModelSection(preset="crate-tiny"), 512, "data.seq_len: 512 exceeds the model's max_position_embeddings (256)"),
        (ModelSection(config_path="/nowhere/config.json"), 64, "model: "),
        (ModelSection(vocab_size=500), 64, "model.vocab_size: 500 is smaller than the tokenizer's 1000 tokens"),
    ],
)
def test_bad_model_sections_are_one_line_errors(section, seq_len, message):
    with pytest.raises(ConfigError) as error:
        build_model_config(section, 1000, 0, seq_len)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


@pytest.mark.parametrize("arch", ["crate", "gpt2"])
def test_weight_decay_skips_norms_biases_embeddings_and_tost_statistics(arch):
    knobs = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}
    section = ModelSection(arch=arch, **knobs, overrides={"attention_type": "tssa"} if arch == "crate" else {})
    model = build_model(build_model_config(section, 256, 0, 64))
    decay, plain = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    plain_names = {names[id(p)] for p in plain["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"])
    assert not any("embed" in n or "wte" in n or "wpe" in n or "norm" in n or "ln_" in n for n in decay_names)
    if arch == "crate":
        assert any(n.endswith("position_bias") for n in plain_names)
        assert any(n.endswith("temperature") for n in plain_names)
        assert any("subspace_proj" in n for n in decay_names)
    assert len(decay_names) + len(plain_names) == len(list(model.parameters()))
