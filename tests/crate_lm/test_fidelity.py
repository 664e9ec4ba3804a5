"""The published presets are the published models: each official behaviour pinned from the equations and shapes
(no final norm in Causal-CRATE, LayerNorm eps per family in CRATE-alpha, no biases in the ToST LM, the dictionaries'
init at the official fan-in, the padded vocabulary never scored, no output projection for one-head vision CRATE)
and the exact parameter counts at the official vocabulary padding. docs/models.md records the comparison with the
official codes themselves."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from crate_lm import (
    CrateConfig,
    CrateForCausalLM,
    CrateForImageClassification,
    config_from_preset,
    count_parameters,
    model_for_config,
    preset_info,
    preset_names,
)

GPT2_VOCAB, PADDED_VOCAB, BLOCK = 50257, 50304, 1024


def published(model_type: str) -> list[str]:
    return [n for n in preset_names(model_type) if "published_params" in preset_info(n)]


# ---------------------------------------------------------------------------------------------------- counts

# Every parameter of the official models, from their shapes (d width, L layers, K heads, V = 50304 rows):
#   Causal-CRATE (crate.py):       L (3d^2 + 5d) + V d             (w d^2, U_out d^2 + d, D d^2, 2 LNs; no final LN)
#   CRATE-LM (crate_overcomplete): L (6d^2 + 5d) + 2d + V d        (D is 4d x d; final LN)
#   CRATE-alpha:                   L (10d^2 + 4d) + 2d + V d       (D, D1 4d^2 each; U_out without bias)
#   ToST (bias=False):             L (10d^2 + 4d + K (1 + 1024)) + d + V d   (MLP 8d^2, LN weights and LayerScales
#                                  4d, one temperature and a 1024-row position bias per head; final LN weight)
#   vision CRATE / CRATE-alpha:    every parameter, position table and head included
EXACT_PARAMS = {
    "causal-crate-base": 59_913_216,
    "crate-lm-12l": 81_148_416,
    "crate-alpha-lm-small": 57_238_528,
    "crate-alpha-lm-base": 109_450_752,
    "tost-base": 109_597_584,
    "tost-medium": 303_662_464,
    "tost-large": 655_136_720,
    "crate-t16": 6_090_856,
    "crate-s16": 13_116_328,
    "crate-b16": 22_796_008,
    "crate-l16": 77_641_192,
    "crate-alpha-b16": 72_328_936,
}


def lm_formula(name: str) -> int:
    config = config_from_preset(name)
    d, layers, heads, rows = config.hidden_size, config.num_hidden_layers, config.num_attention_heads, PADDED_VOCAB
    per_layer, final = {
        "crate": (3 * d * d + 5 * d, 0),
        "crate-lm": (6 * d * d + 5 * d, 2 * d),
        "crate-alpha": (10 * d * d + 4 * d, 2 * d),
        "tost": (10 * d * d + 4 * d + heads * (1 + BLOCK), d),
    }[config.variant]
    return layers * per_layer + final + rows * d


def rounds_to(count: int, figure: float) -> bool:
    """``count`` written at the precision the figure was published with (its last non-zero digit) is the figure."""
    unit = 10 ** (len(str(int(figure))) - len(str(int(figure)).rstrip("0")))
    return round(count / unit) * unit == figure


def test_every_published_preset_has_an_exact_count():
    assert set(published("crate")) | set(published("crate_vision")) == set(EXACT_PARAMS)


@pytest.mark.parametrize("name", published("crate"))
def test_published_lm_counts_are_exact_at_the_official_vocabulary_padding(name):
    config = config_from_preset(name)
    assert (config.vocab_size, config.padded_vocab_size) == (GPT2_VOCAB, PADDED_VOCAB)
    with torch.device("meta"):
        params = count_parameters(CrateForCausalLM(config))
    assert params == EXACT_PARAMS[name] == lm_formula(name)
    info = preset_info(name)
    if "params_note" not in info:  # CRATE-alpha-B's 120M has no published shape (see the note)
        assert rounds_to(params, info["published_params"]), params


@pytest.mark.parametrize("name", published("crate_vision"))
def test_published_vision_counts_are_exact(name):
    with torch.device("meta"):
        model = CrateForImageClassification(config_from_preset(name))
    params = count_parameters(model, exclude_position_embeddings=False)
    assert params == sum(p.numel() for p in model.parameters()) == EXACT_PARAMS[name]
    assert rounds_to(params, preset_info(name)["published_params"]), params


# ---------------------------------------------------------------------------------------------------- Causal-CRATE


def tiny(name: str, seed: int = 0, **overrides) -> nn.Module:
    """A published preset's knobs at a tiny shape."""
    torch.manual_seed(seed)
    shape = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}
    if preset_info(name).get("model_type") == "crate_vision":
        shape.update(image_size=16, patch_size=4, num_labels=5)
    else:
        shape.update(vocab_size=100, max_position_embeddings=32, bos_token_id=0, eos_token_id=0)
    return model_for_config(config_from_preset(name, **{**shape, **overrides})).eval()


def test_causal_crate_base_feeds_the_last_ista_output_to_the_tied_head():
    model = tiny("causal-crate-base")
    assert model.model.norm is None and not any("model.norm" in n for n, _ in model.named_parameters())
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        last = model.model.layers[-1]
        x = out.hidden_states[-2]  # the last layer's input
        z_half = x + last.attention(last.attention_norm(x))[0]
        expected = last.ista(last.sparse_norm(z_half))[0] @ model.model.embed_tokens.weight[:100].T
    torch.testing.assert_close(out.logits, expected)
    assert (out.hidden_states[-1] >= 0).all()  # a ReLU output, not normalised


def test_the_final_layernorm_variant_is_a_separate_preset():
    plain, with_norm = config_from_preset("causal-crate-base"), config_from_preset("causal-crate-base-ln")
    assert not plain.final_layer_norm and with_norm.final_layer_norm
    assert "published_params" not in preset_info("causal-crate-base-ln")
    assert {k: v for k, v in plain.to_dict().items() if k != "final_layer_norm"} == {
        k: v for k, v in with_norm.to_dict().items() if k != "final_layer_norm"
    }
    assert isinstance(tiny("causal-crate-base-ln").model.norm, nn.LayerNorm)


# ---------------------------------------------------------------------------------------------------- CRATE-alpha


def layer_norms(model: nn.Module) -> tuple[list[nn.LayerNorm], nn.LayerNorm]:
    """(the block norms, the final / head norm)."""
    blocks = [m for layer in model.base_model.layers for m in layer.modules() if isinstance(m, nn.LayerNorm)]
    return blocks, model.base_model.norm


@pytest.mark.parametrize("name", ["crate-alpha-lm-small", "crate-alpha-lm-base", "crate-alpha-b16"])
def test_crate_alpha_block_norms_use_eps_1e6_and_the_head_norm_1e5(name):
    blocks, final = layer_norms(tiny(name))
    assert len(blocks) == 4 and {m.eps for m in blocks} == {1e-6} and final.eps == 1e-5


def test_eps_per_family_changes_the_function_where_the_variance_is_small():
    # LN(x) = (x - mean) / sqrt(var + eps): at var = 1e-6 the two eps give outputs apart by a factor sqrt(2 / 1.1).
    x = torch.tensor([[1e-3, -1e-3] * 16])
    blocks, final = layer_norms(tiny("crate-alpha-lm-small"))
    ratio = blocks[0](x)[0, 0] / final(x)[0, 0]
    assert ratio.item() == pytest.approx(math.sqrt((1e-6 + 1e-5) / (1e-6 + 1e-6)), rel=1e-4)


@pytest.mark.parametrize("name", [n for n in published("crate") if not n.startswith("crate-alpha")])
def test_other_published_lms_use_eps_1e5_everywhere(name):
    config = config_from_preset(name)
    assert config.layer_norm_eps == config.final_layer_norm_eps == 1e-5


# ---------------------------------------------------------------------------------------------------- ToST


@pytest.mark.parametrize("name", ["tost-base", "tost-medium", "tost-large"])
def test_tost_lm_has_no_bias_anywhere(name):
    config = config_from_preset(name)
    with torch.device("meta"):
        model = CrateForCausalLM(config)
        with_biases = CrateForCausalLM(
            config_from_preset(name, layer_norm_bias=True, attention_out_bias=True, mlp_bias=True)
        )
    assert not [n for n, _ in model.named_parameters() if n.endswith("bias") and "position_bias" not in n]
    d, layers = config.hidden_size, config.num_hidden_layers
    extra = count_parameters(with_biases) - count_parameters(model)
    # per layer: 2 LayerNorms (2d), U_out (d), MLP in (4d) and out (d); the final LayerNorm (d)
    assert extra == layers * 8 * d + d == {"tost-base": 74_496, "tost-medium": 197_632, "tost-large": 369_920}[name]


def test_tost_without_biases_is_the_equation():
    model = tiny("tost-base")
    layer = model.model.layers[0]
    x = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(2))
    normed = F.layer_norm(x, (32,), layer.attention_norm.weight)  # LN with weight only
    torch.testing.assert_close(layer.attention_norm(x), normed)
    hidden = layer.mlp.fc_out.weight @ F.gelu(layer.mlp.fc_in.weight @ x[0].T)
    torch.testing.assert_close(layer.mlp(x)[0][0], hidden.T)


# ---------------------------------------------------------------------------------------------------- init


@pytest.mark.parametrize("name", ["crate-lm-12l", "crate-alpha-lm-base", "crate-alpha-b16"])
def test_dictionary_init_has_the_official_fan_in_d(name):
    # Kaiming-uniform (a = 0, gain sqrt 2) with fan-in d = 768: U(-b, b), b = sqrt(6 / 768) = 0.0884, std b / sqrt 3.
    torch.manual_seed(0)
    ista = model_for_config(config_from_preset(name, num_hidden_layers=1)).base_model.layers[0].ista
    bound = math.sqrt(6 / 768)
    dictionaries = [ista.dictionary] + ([ista.decoder] if ista.decoder is not None else [])
    assert len(dictionaries) == (2 if "alpha" in name else 1)
    for dictionary in dictionaries:
        assert dictionary.shape == (768, 3072)
        assert dictionary.abs().max().item() <= bound
        assert dictionary.abs().max().item() > 0.999 * bound
        assert dictionary.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.01)


def test_dictionary_fan_in_default_keeps_the_older_init():
    torch.manual_seed(0)
    config = config_from_preset("crate-lm-tiny")
    dictionary = CrateForCausalLM(config).model.layers[0].ista.dictionary
    assert config.ista_dictionary_fan_in == "dictionary_size"
    assert dictionary.std().item() == pytest.approx(math.sqrt(2 / (4 * 128)), rel=0.03)


# ---------------------------------------------------------------------------------------------------- vocabulary


def padded_model(**overrides) -> CrateForCausalLM:
    model = tiny("causal-crate-base", **overrides)
    assert model.config.padded_vocab_size == 128 and model.lm_head.weight.shape[0] == 128
    with torch.no_grad():  # the last ISTA output is >= 0: these rows would win every draw, were they ever scored
        model.lm_head.weight[100:] = 50.0
    return model


def test_padded_rows_are_never_scored_sampled_or_in_the_loss():
    model = padded_model()
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(3))
    out = model(ids, labels=ids)
    assert out.logits.shape == (2, 8, 100)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, 100), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()  # the padded rows take no part: no gradient reaches them
    gradient = model.lm_head.weight.grad
    assert gradient[100:].abs().max() == 0 and gradient[:100].abs().max() > 0
    torch.manual_seed(4)
    sampled = model.generate(ids, max_new_tokens=6, do_sample=True, temperature=5.0, top_k=0, num_return_sequences=2)
    greedy = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert sampled[:, 8:].max() < 100 and greedy[:, 8:].max() < 100


def test_padded_model_saves_loads_and_resizes(tmp_path):
    model = padded_model()
    ids = torch.randint(0, 100, (1, 6), generator=torch.Generator().manual_seed(5))
    model.save_pretrained(tmp_path)
    loaded = CrateForCausalLM.from_pretrained(tmp_path).eval()
    assert (loaded.config.vocab_size, loaded.config.vocab_pad_multiple) == (100, 64)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    loaded.resize_token_embeddings(130)  # two tokens added: the table grows to the next multiple of 64
    assert loaded.config.vocab_size == 130 and loaded.lm_head.weight.shape[0] == 192
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert loaded(ids).logits.shape[-1] == 130


def test_unpadded_default_and_bad_padding():
    assert CrateConfig().padded_vocab_size == CrateConfig().vocab_size == GPT2_VOCAB
    with pytest.raises(ValueError, match="vocab_pad_multiple"):
        CrateConfig(vocab_pad_multiple=0)
    with pytest.raises(ValueError, match="ista_dictionary_fan_in"):
        CrateConfig(ista_dictionary_fan_in="fan_out")


# ---------------------------------------------------------------------------------------------------- vision


@pytest.mark.parametrize("name", ["crate-b16", "crate-alpha-b16"])
def test_one_head_vision_crate_without_output_projection_is_the_equation(name):
    model = tiny(name, num_attention_heads=1, attention_out_projection=False)
    attention = model.model.layers[0].attention
    assert attention.out_proj is None and not any("out_proj" in n for n, _ in model.named_parameters())
    x = torch.randn(2, 17, 32, generator=torch.Generator().manual_seed(6))
    w = attention.subspace_proj(x)
    expected = torch.softmax(w @ w.transpose(1, 2) / math.sqrt(32), dim=-1) @ w  # MSSA with U_out = I
    torch.testing.assert_close(attention(x)[0], expected)
    per_layer = 2 * 32 * 32 + 4 * 32 + (7 * 32 * 32 if "alpha" in name else 0)  # U, D, 2 LNs (alpha: D, D1 4d^2)
    assert sum(p.numel() for p in model.model.layers[0].parameters()) == per_layer
