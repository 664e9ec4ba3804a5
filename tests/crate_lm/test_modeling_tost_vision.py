"""ToST vision (the official image classifier of RobinWu218/ToST ``tost_vision/tost.py``): the forward pass against a
reference written here from the paper's equations and the official shapes, the published parameter counts, the
official init, the skeleton's particulars (TSSA over the patches only, the CLS token joining at class attention,
the patch tokens' pass-through), HF behaviour and one-line config errors. docs/models.md records the comparison
with the official code itself (weights copied one to one)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from crate_lm import (
    ToSTForImageClassification,
    ToSTVisionConfig,
    ToSTVisionModel,
    config_from_preset,
    count_parameters,
    preset_info,
    preset_names,
)
from crate_lm.whitebox import cls_attention_maps, measure_vision

# Every parameter, counted by the official code's own models (tost_cab_tiny_12_p16, tost_cab_small_12_p16,
# tost_cab_medium_24_p16 at 224x224 with 1000 classes).
EXACT_PARAMS = {"tost-vision-t": 5_769_328, "tost-vision-s": 22_589_944, "tost-vision-m": 71_481_064}


def tiny(seed: int = 0, **overrides) -> ToSTForImageClassification:
    torch.manual_seed(seed)
    shape = {"image_size": 32, "num_channels": 3, "hidden_size": 32, "num_hidden_layers": 2, "num_labels": 5}
    return ToSTForImageClassification(config_from_preset("tost-vision-s", **{**shape, **overrides})).eval()


def perturbed(model: ToSTForImageClassification, seed: int = 1) -> ToSTForImageClassification:
    """Every parameter and BatchNorm statistic moved off its init, so no term of the forward pass hides."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.copy_(torch.randn(buffer.shape, generator=generator))
            elif name.endswith("running_var"):
                buffer.copy_(0.5 + torch.rand(buffer.shape, generator=generator))
    return model


# ---------------------------------------------------------------------------------------------------- reference


def reference_logits(model: ToSTForImageClassification, x: torch.Tensor) -> torch.Tensor:
    """The official forward pass from the equations, on the model's weights (eval mode)."""
    config, p = model.config, dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    d, heads, eps = config.hidden_size, config.num_attention_heads, config.layer_norm_eps

    def ln(z, prefix):
        return F.layer_norm(z, (d,), p[f"{prefix}.weight"], p[f"{prefix}.bias"], eps)

    def linear(z, prefix):
        return z @ p[f"{prefix}.weight"].T + p[f"{prefix}.bias"]

    def mlp(z, prefix):
        return linear(F.gelu(linear(z, f"{prefix}.fc_in")), f"{prefix}.fc_out")

    # Stem: k = log2(P) stride-2 3x3 convolutions, BatchNorm (running statistics), GELU between.
    h = x
    convs = sorted({int(name.split(".")[3]) for name in p if name.startswith("model.stem.layers.")})
    for i, index in enumerate(convs[::2]):
        if i:
            h = F.gelu(h)
        h = F.conv2d(h, p[f"model.stem.layers.{index}.weight"], stride=2, padding=1)
        bn = f"model.stem.layers.{index + 1}"
        h = (h - buffers[f"{bn}.running_mean"][:, None, None]) / torch.sqrt(
            buffers[f"{bn}.running_var"][:, None, None] + 1e-5
        ) * p[f"{bn}.weight"][:, None, None] + p[f"{bn}.bias"][:, None, None]
    rows, cols = h.shape[2:]
    tokens = h.flatten(2).transpose(1, 2)  # (B, N, d), row-major

    # Fourier positions: row r and column c scaled to (0, 2 pi]; frequency i has wavelength 10000^(2 floor(i/2) / F).
    freqs = config.position_encoding_dim
    omega = torch.tensor([10000.0 ** (2 * (i // 2) / freqs) for i in range(freqs)])
    r = torch.arange(1, rows + 1).float() / (rows + 1e-6) * 2 * math.pi
    c = torch.arange(1, cols + 1).float() / (cols + 1e-6) * 2 * math.pi
    features = []
    for n in range(rows * cols):
        row_angles, col_angles = r[n // cols] / omega, c[n % cols] / omega
        parts = [torch.where(torch.arange(freqs) % 2 == 0, a.sin(), a.cos()) for a in (row_angles, col_angles)]
        features.append(torch.cat(parts))
    features = torch.stack(features)  # (N, 2F)
    projection = p["model.positions.projection.weight"][:, :, 0, 0]
    tokens = tokens + features @ projection.T + p["model.positions.projection.bias"]

    # TSSA layers over the patch tokens (Eq. 10: Pi a softmax over the heads of the normalised squared projection).
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}"
        w = linear(ln(tokens, f"{prefix}.attention_norm"), f"{prefix}.attention.subspace_proj")
        w = w.unflatten(-1, (heads, d // heads)).transpose(1, 2)  # (B, K, N, p)
        normalised_sq = w.square() / w.square().sum(dim=2, keepdim=True)
        temperature = p[f"{prefix}.attention.temperature"][None, :, None]
        pi = torch.softmax(normalised_sq.sum(-1) * temperature, dim=1)  # (B, K, N)
        weights = pi / (pi.sum(-1, keepdim=True) + 1e-8)
        second_moment = torch.einsum("bkn,bknp->bkp", weights, w.square())[:, :, None]
        attended = (-(w * pi[..., None]) / (1 + second_moment)).transpose(1, 2).flatten(2)
        attended = linear(attended, f"{prefix}.attention.out_proj")
        tokens = tokens + p[f"{prefix}.attention_scale.scale"] * attended
        tokens = tokens + p[f"{prefix}.mlp_scale.scale"] * mlp(ln(tokens, f"{prefix}.sparse_norm"), f"{prefix}.mlp")

    # Class attention: the CLS token joins; only it queries; patch tokens pass through as the official code passes them.
    z = torch.cat([p["model.cls_token"].expand(x.shape[0], -1, -1), tokens], dim=1)
    for layer in range(config.num_class_attention_layers):
        prefix = f"model.class_attention_layers.{layer}"
        y = ln(z, f"{prefix}.attention_norm")
        q, k, v = linear(y, f"{prefix}.attention.qkv_proj").unflatten(-1, (3, heads, d // heads)).unbind(2)
        scores = torch.einsum("bkp,bnkp->bkn", q[:, 0], k) / math.sqrt(d // heads)
        cls = torch.einsum("bkn,bnkp->bkp", scores.softmax(-1), v).flatten(1)
        cls = linear(cls, f"{prefix}.attention.out_proj")
        z = z + p[f"{prefix}.attention_scale.scale"] * torch.cat([cls[:, None], y[:, 1:]], dim=1)
        z = ln(z, f"{prefix}.mlp_norm")
        z = z + torch.cat([p[f"{prefix}.mlp_scale.scale"] * mlp(z[:, :1], f"{prefix}.mlp"), z[:, 1:]], dim=1)
    return linear(ln(z, "model.norm")[:, 0], "classifier")


@pytest.mark.parametrize("patch_size, layer_scale", [(8, 1.0), (16, 1e-5), (4, 0.5)])
def test_forward_is_the_official_equations(patch_size, layer_scale):
    model = perturbed(tiny(patch_size=patch_size, layer_scale_init=layer_scale))
    x = torch.randn(3, 3, 32, 48, generator=torch.Generator().manual_seed(2))  # a non-square grid too
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, reference_logits(model, x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- sizes


def test_presets_are_the_official_models_with_their_published_counts():
    assert {n for n in preset_names("tost_vision") if "published_params" in preset_info(n)} == set(EXACT_PARAMS)
    for name, exact in EXACT_PARAMS.items():
        with torch.device("meta"):
            model = ToSTForImageClassification(config_from_preset(name))
        assert count_parameters(model, exclude_position_embeddings=False) == exact, name
        info = preset_info(name)
        published, unit = info["published_params"], 100_000
        if "params_note" in info:  # ToST-M: the paper's 68.1M is not the official code's model (the note says why)
            assert "71,481,064" in info["params_note"]
        else:
            assert round(exact / unit) * unit == published, (name, exact)
    small, medium = config_from_preset("tost-vision-s"), config_from_preset("tost-vision-m")
    assert (small.hidden_size, small.num_hidden_layers, small.num_attention_heads, small.layer_scale_init) == (
        384,
        12,
        8,
        1.0,
    )
    assert (medium.hidden_size, medium.num_hidden_layers, medium.layer_scale_init) == (512, 24, 1e-5)
    assert small.layer_norm_eps == medium.layer_norm_eps == 1e-6 and small.qkv_bias and small.num_patches == 196


def test_stem_widths_and_the_skeleton():
    model = tiny(patch_size=16, hidden_size=64)
    convs = [m for m in model.model.stem.layers if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride, c.bias) for c in convs] == [
        (3, 8, (2, 2), None),
        (8, 16, (2, 2), None),
        (16, 32, (2, 2), None),
        (32, 64, (2, 2), None),
    ]
    tssa = model.model.layers[0].attention
    assert tssa.subspace_proj.bias is not None and tssa.out_proj.bias is not None  # official qkv_bias=True
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x, output_hidden_states=True, output_attentions=True, output_sparse_codes=True)
    # TSSA runs over the 2x2 patch tokens only; the CLS token joins at the class-attention layers.
    assert [h.shape[1] for h in out.hidden_states] == [4, 4, 4, 5, 5]
    assert [a.shape for a in out.attentions] == [(2, 8, 4)] * 2 + [(2, 8, 5)] * 2
    assert torch.allclose(out.attentions[0].sum(1), torch.ones(2, 4))  # Pi: each token's membership over the heads
    assert torch.allclose(out.attentions[-1].sum(-1), torch.ones(2, 8))  # the CLS token's weights
    assert len(out.sparse_codes) == len(out.subspace_projections) == 2


def test_class_attention_passes_the_patch_tokens_through_as_the_official_code():
    model = perturbed(tiny())
    layer = model.model.class_attention_layers[0]
    z = torch.randn(2, 5, 32)
    with torch.no_grad():
        out, _ = layer(z)
        normed = layer.attention_norm(z)
        after_attention = z[:, 1:] + layer.attention_scale.scale * normed[:, 1:]
        # LN2 over every token (tokens_norm=True), then the MLP branch adds the patch tokens to themselves.
        expected = 2 * layer.mlp_norm(torch.cat([z[:, :1], after_attention], dim=1))[:, 1:]
        torch.testing.assert_close(out[:, 1:], expected)


# ---------------------------------------------------------------------------------------------------- init


def test_init_is_the_official_one():
    torch.manual_seed(0)
    config = config_from_preset("tost-vision-s", num_hidden_layers=2, layer_scale_init=1e-5)
    model = ToSTForImageClassification(config)
    linears = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    weights = torch.cat([w.flatten() for w in linears])
    # timm's trunc_normal_(std=0.02) cuts at +-2 (absolute, not 2 std): in effect N(0, 0.02), zero mean.
    assert weights.std().item() == pytest.approx(0.02, rel=0.02) and abs(weights.mean().item()) < 1e-3
    assert all(m.bias.abs().max() == 0 for m in model.modules() if isinstance(m, torch.nn.Linear))
    conv = model.model.stem.layers[0]
    bound = 1 / math.sqrt(conv.in_channels * 9)
    assert conv.weight.abs().max() <= bound and conv.weight.abs().max() > 0.9 * bound  # torch's default, U(±1/√fan_in)
    assert all(torch.all(layer.attention.temperature == 1) for layer in model.model.layers)
    scales = [m.scale for m in model.modules() if type(m).__name__ == "CrateLayerScale"]
    assert len(scales) == 8 and all(torch.all(s == 1e-5) for s in scales)
    assert model.model.cls_token.std().item() == pytest.approx(0.02, rel=0.3)


# ---------------------------------------------------------------------------------------------------- HF behaviour


def test_save_reload_auto_classes_and_white_box_measures(tmp_path):
    model = perturbed(tiny())
    model.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, ToSTVisionConfig) and set(config.auto_map) >= {
        "AutoConfig",
        "AutoModel",
        "AutoModelForImageClassification",
    }
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, model(x).logits)  # BatchNorm statistics travel too
    assert isinstance(AutoModel.from_pretrained(tmp_path), ToSTVisionModel)
    rows = measure_vision(model, x)
    assert [row["layer"] for row in rows] == [0, 1] and all(0 < row["sparsity_l0"] <= 1 for row in rows)
    assert all(row["pi_entropy"] >= 0 for row in rows)
    assert cls_attention_maps(model, x).shape == (2, 8, 2, 2)


def test_trains_one_step_and_checkpoints_its_gradients():
    model = tiny().train()
    model.gradient_checkpointing_enable()
    x, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    loss = model(x, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for n, p in model.named_parameters()), [
        n for n, p in model.named_parameters() if p.grad is None
    ]


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("patch_size", 6, "ToSTVisionConfig.patch_size=6 is invalid: must be a power of two"),
        ("hidden_size", 36, "ToSTVisionConfig.hidden_size=36 is invalid: must be divisible by patch_size / 2"),
        ("num_channels", 2, "ToSTVisionConfig.num_channels=2 is invalid"),
        ("num_class_attention_layers", -1, "ToSTVisionConfig.num_class_attention_layers=-1 is invalid"),
        ("position_encoding_dim", 3, "ToSTVisionConfig.position_encoding_dim=3 is invalid: must be even"),
    ],
)
def test_bad_config_values_are_one_line_errors(field, value, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("(", r"\(")) as error:
        ToSTVisionConfig(**{"hidden_size": 32, "num_attention_heads": 4, "patch_size": 16, field: value})
    assert "\n" not in str(error.value)
