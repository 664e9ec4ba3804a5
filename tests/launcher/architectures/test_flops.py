"""The analytic FLOP formulas agree with torch's FlopCounterMode on real forward passes."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import GPT2Config, GPT2LMHeadModel

import crate_lm
from launcher.architectures.registry import forward_flops_per_token, training_flops_per_token

VARIANTS = [
    {},
    {"ista_dictionary_ratio": 4, "ista_steps": 2},
    {"ista_dictionary_ratio": 4, "ista_steps": 2, "ista_decoupled_decoder": True, "ista_residual": True},
    {"attention_type": "tssa"},
    # the official presets' knobs: no final LN and a padded table (Causal-CRATE), no out-projection (one-head
    # vision), no biases (ToST)
    {"final_layer_norm": False, "vocab_pad_multiple": 64},
    {"attention_out_projection": False, "num_attention_heads": 1},
    {"attention_type": "tssa", "attention_out_projection": False},
    {"attention_type": "tssa", "layer_norm_bias": False, "mlp_bias": False, "attention_out_bias": False},
]


def counted_flops(model, ids, **kwargs) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(ids, **kwargs)
    return counter.get_total_flops()


@pytest.mark.parametrize("knobs", VARIANTS)
@pytest.mark.parametrize("seq_len", [8, 48])  # 2 x 48 tokens > 2d: the fused one-step ISTA
def test_crate_formula_matches_flop_counter(knobs, seq_len):
    config = crate_lm.config_from_preset("crate-test", **knobs)
    model = crate_lm.CrateForCausalLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (2, seq_len))
    # output_attentions takes the explicit matmul path, which the counter sees (SDPA kernels it may not).
    expected = forward_flops_per_token(config, seq_len, tokens_per_call=ids.numel()) * ids.numel()
    assert counted_flops(model, ids, output_attentions=True) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("knobs", [{}, {"num_attention_heads": 1, "attention_out_projection": False}])
def test_crate_vision_formula_matches_flop_counter(knobs):
    config = crate_lm.config_from_preset("crate-vision-test", **knobs)
    model = crate_lm.CrateForImageClassification(config).eval()
    pixels = torch.randn(2, 3, 16, 16)
    tokens = 2 * (1 + 16)
    expected = forward_flops_per_token(config, 1 + 16, tokens_per_call=tokens) * tokens
    assert counted_flops(model, pixels, output_attentions=True) == pytest.approx(expected, rel=1e-9)


def test_gpt2_formula_matches_flop_counter():
    config = GPT2Config(vocab_size=512, n_embd=32, n_layer=2, n_head=4, attn_implementation="eager")
    model = GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 512, (2, 24))
    assert counted_flops(model, ids) == forward_flops_per_token(config, 24) * ids.numel()


def test_training_is_three_forwards_and_unknown_model_is_refused():
    config = crate_lm.config_from_preset("crate-test")
    assert training_flops_per_token(config, 16) == 3 * forward_flops_per_token(config, 16)
    with pytest.raises(ValueError, match="model_type='bert'"):
        forward_flops_per_token(type("C", (), {"model_type": "bert"})(), 16)
