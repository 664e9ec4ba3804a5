"""CRATE vision models as HuggingFace models: sizes, non-causal attention, ToST's vision operator, position
interpolation, save/load and remote code, image processor and pipeline, white-box measures, training sanity."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
    pipeline,
)

from crate_lm import (
    VARIANT_KNOBS,
    CrateForImageClassification,
    CrateImageProcessor,
    CrateVisionConfig,
    CrateVisionModel,
    ToSTForImageClassification,
    config_from_preset,
    interpolate_position_table,
    preset_info,
    preset_names,
)
from crate_lm.modeling_crate import CrateTSSA
from crate_lm.whitebox import cls_attention_maps, measure_vision

VARIANTS = ("crate", "crate-alpha", "tost")
LABELS = ["cat", "dog", "bird", "fish", "frog"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine two threads spin-wait for
    each other (the memorisation test slows from 0.2 s to 20 s)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_model(variant: str = "crate", seed: int = 0, **overrides) -> CrateForImageClassification:
    torch.manual_seed(seed)
    config = config_from_preset("crate-vision-test", **{**VARIANT_KNOBS[variant], **overrides})
    assert config.variant == variant
    return CrateForImageClassification(config).eval()


def random_pixels(batch: int = 2, side: int = 16, channels: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, channels, side, side, generator=torch.Generator().manual_seed(seed))


def tiny_vit(seed: int = 0) -> ViTForImageClassification:
    torch.manual_seed(seed)
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        image_size=16,
        patch_size=4,
        num_labels=5,
    )
    return ViTForImageClassification(config).eval()


# ---------------------------------------------------------------------------------------------------- sizes


def test_published_vision_presets_are_the_expected_ones():
    published = {n for n in preset_names("crate_vision") if "published_params" in preset_info(n)}
    assert {"crate-t16", "crate-s16", "crate-b16", "crate-l16", "crate-alpha-b16"} <= published


def test_crate_layer_has_3d2_plus_5d_parameters():
    model = tiny_model()
    d = model.config.hidden_size
    for layer in model.model.layers:
        assert sum(p.numel() for p in layer.parameters()) == 3 * d * d + 5 * d


# ---------------------------------------------------------------------------------------------------- forward


@pytest.mark.parametrize(
    "variant, overrides",
    [(v, {}) for v in VARIANTS]
    + [
        ("crate", {"pooling": "mean"}),
        ("crate", {"patch_embedding_type": "conv"}),
        ("tost", {"pooling": "mean", "patch_embedding_type": "conv"}),
    ],
)
def test_forward_loss_and_gradients_reach_every_parameter(variant, overrides):
    model = tiny_model(variant, **overrides).train()
    labels = torch.tensor([0, 4, 2])
    out = model(random_pixels(3), labels=labels)
    assert out.logits.shape == (3, model.config.num_labels)
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, labels))
    out.loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().max() > 0, name


def test_pooling_feeds_the_head_from_the_cls_token_or_the_mean():
    for pooling in ("cls", "mean"):
        model = tiny_model(pooling=pooling)
        with torch.no_grad():
            out = model.model(random_pixels(), output_hidden_states=True)
            last = out.hidden_states[-1]
            pooled = last[:, 0] if pooling == "cls" else last.mean(1)
            torch.testing.assert_close(out.pooler_output, model.model.norm(pooled))
            torch.testing.assert_close(model(random_pixels()).logits, model.classifier(out.pooler_output))


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_patch_tokens_follow_the_grid_in_row_major_order(kind):
    embeddings = tiny_model(patch_embedding_type=kind).model.embeddings.patch_embeddings
    pixels = random_pixels(2, side=12)
    with torch.no_grad():
        tokens, grid = embeddings(pixels)
        assert grid == (3, 3) and tokens.shape == (2, 9, 32)
        for row in range(3):
            for column in range(3):
                patch = pixels[:, :, 4 * row : 4 * row + 4, 4 * column : 4 * column + 4]
                if kind == "conv":
                    weight, bias = embeddings.projection.weight, embeddings.projection.bias
                    expected = patch.flatten(1) @ weight.flatten(1).T + bias
                else:  # flattened in (row, column, channel) order, then LN -> Linear -> LN
                    flat = patch.permute(0, 2, 3, 1).reshape(2, -1)
                    expected = embeddings.output_norm(embeddings.projection(embeddings.input_norm(flat)))
                torch.testing.assert_close(tokens[:, 3 * row + column], expected, rtol=1e-5, atol=1e-5)


def test_wrong_number_of_channels_or_indivisible_size_is_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="pixel_values"):
        model(random_pixels(channels=1))
    with pytest.raises(ValueError, match="patch_size=4"):
        model(torch.randn(1, 3, 18, 16))


# ---------------------------------------------------------------------------------------------------- attention


@pytest.mark.parametrize("variant", VARIANTS)
def test_attention_is_not_causal_last_patch_changes_the_cls_token(variant):
    # LayerScale 1 so that ToST's attention branch is not scaled down to 1e-5 at init.
    model = tiny_model(variant, layer_scale_init=1.0)
    pixels = random_pixels()
    changed = pixels.clone()
    # Only the last patch (bottom-right) changes; not by a constant, which the patch LayerNorm would remove.
    changed[:, :, -4:, -4:] = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        before = model.model(pixels).last_hidden_state
        after = model.model(changed).last_hidden_state
    assert (after[:, -1] - before[:, -1]).abs().max() > 1e-2
    assert (after[:, 0] - before[:, 0]).abs().max() > 1e-4
    assert (after[:, 1] - before[:, 1]).abs().max() > 1e-5  # the first patch sees the last one too


@pytest.mark.parametrize("variant", ["crate", "crate-alpha"])
def test_mssa_attentions_are_row_stochastic_and_do_not_change_the_logits(variant):
    model = tiny_model(variant)
    config = model.config
    pixels = random_pixels(3)
    with torch.no_grad():
        plain = model(pixels).logits
        eager = model(pixels, output_attentions=True)
    tokens = 1 + config.num_patches
    assert len(eager.attentions) == config.num_hidden_layers
    for weights in eager.attentions:
        assert weights.shape == (3, config.num_attention_heads, tokens, tokens)
        assert (weights >= 0).all()
        torch.testing.assert_close(weights.sum(-1), torch.ones(3, config.num_attention_heads, tokens))
        assert (weights[..., -1] > 0).all()  # every token, the CLS token included, attends to the last patch
    torch.testing.assert_close(eager.logits, plain, rtol=1e-5, atol=1e-5)


def test_tost_attentions_are_memberships_over_heads():
    model = tiny_model("tost")
    config = model.config
    with torch.no_grad():
        plain = model(random_pixels(3)).logits
        out = model(random_pixels(3), output_attentions=True)
    torch.testing.assert_close(out.logits, plain, rtol=1e-5, atol=1e-5)
    for membership in out.attentions:
        assert membership.shape == (3, config.num_attention_heads, 1 + config.num_patches)
        assert (membership >= 0).all()
        torch.testing.assert_close(membership.sum(1), torch.ones(3, 1 + config.num_patches))


def reference_vision_tssa(x, subspace_weight, temperature, out_proj, heads):
    """The official vision ToST operator, from its equations (sums over all N tokens, no position bias)."""
    batch, tokens, width = x.shape
    p = width // heads
    w = (x @ subspace_weight.T).reshape(batch, tokens, heads, p).permute(0, 2, 1, 3)  # (B, K, N, p)
    w_sq = w.square() / w.square().sum(dim=2, keepdim=True)
    pi = torch.softmax(temperature[None, :, None] * w_sq.sum(-1), dim=1)  # (B, K, N), softmax over heads
    moment = (pi[..., None] * w.square()).sum(2, keepdim=True) / (pi.sum(2)[..., None, None] + 1e-8)  # (B,K,1,p)
    heads_out = -(pi[..., None] * w) / (1.0 + moment)
    return out_proj(heads_out.permute(0, 2, 1, 3).reshape(batch, tokens, width)), pi


def test_vision_tssa_matches_the_official_operator():
    torch.manual_seed(0)
    config = config_from_preset("crate-vision-test", **VARIANT_KNOBS["tost"])
    assert config.causal_attention is False and config.tssa_position_bias is False
    attention = CrateTSSA(config, 0)
    assert attention.position_bias is None
    with torch.no_grad():
        attention.temperature.copy_(torch.rand(config.num_attention_heads) * 3 + 0.2)
        torch.nn.init.normal_(attention.subspace_proj.weight, std=0.3)
    x = torch.randn(2, 1 + config.num_patches, config.hidden_size)
    with torch.no_grad():
        out, membership, w = attention(x, position_ids=None)
        expected, expected_pi = reference_vision_tssa(
            x, attention.subspace_proj.weight, attention.temperature, attention.out_proj, config.num_attention_heads
        )
    assert w.shape == (2, config.num_attention_heads, 1 + config.num_patches, config.head_dim)
    torch.testing.assert_close(membership, expected_pi, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # The operator is permutation-equivariant: the token order does not matter.
    layer = tiny_model("tost").model.layers[0]
    permutation = torch.randperm(x.shape[1])
    with torch.no_grad():
        full = layer.attention(x, position_ids=None)[0]
        permuted = layer.attention(x[:, permutation], position_ids=None)[0]
    torch.testing.assert_close(permuted, full[:, permutation], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- save / load


def labelled_config_overrides() -> dict:
    return {"id2label": dict(enumerate(LABELS)), "label2id": {label: i for i, label in enumerate(LABELS)}}


@pytest.mark.parametrize("variant", VARIANTS)
def test_save_and_load_give_identical_logits(variant, tmp_path):
    model = tiny_model(variant, **labelled_config_overrides())
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {
        "model.safetensors",
        "config.json",
        "modeling_crate_vision.py",
        "modeling_crate.py",
        "configuration_crate_vision.py",
        "configuration_crate.py",
    } <= files
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "crate_vision"
    assert saved["auto_map"]["AutoConfig"] == "configuration_crate_vision.CrateVisionConfig"
    assert saved["auto_map"]["AutoModelForImageClassification"] == "modeling_crate_vision.CrateForImageClassification"
    assert saved["auto_map"]["AutoModel"] == "modeling_crate_vision.CrateVisionModel"  # every head, not only the saved
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert type(loaded) is CrateForImageClassification
    assert loaded.config.id2label == dict(enumerate(LABELS))
    pixels = random_pixels()
    with torch.no_grad():
        assert torch.equal(loaded(pixels).logits, model(pixels).logits)
    encoder = AutoModel.from_pretrained(tmp_path).eval()
    assert type(encoder) is CrateVisionModel
    with torch.no_grad():
        assert torch.equal(encoder(pixels).pooler_output, model.model(pixels).pooler_output)


TRUST_REMOTE_CODE_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, sys, torch

    class RefuseCrateLm(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "crate_lm" or name.startswith("crate_lm."):
                raise ImportError("crate_lm is deliberately unavailable in this process")
            return None

    sys.meta_path.insert(0, RefuseCrateLm())
    try:
        import crate_lm  # noqa: F401
        raise SystemExit("crate_lm should not be importable here")
    except ImportError:
        pass

    from transformers import AutoModelForImageClassification
    checkpoint, pixels_path, out_path, classifier_name, encoder_name = sys.argv[1:6]
    model = AutoModelForImageClassification.from_pretrained(checkpoint, trust_remote_code=True).eval()
    assert not any(name.startswith("crate_lm") for name in sys.modules)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    assert type(model).__name__ == classifier_name
    with torch.no_grad():
        torch.save(model(torch.load(pixels_path)).logits, out_path)
    from transformers import AutoImageProcessor, AutoModel  # every other head of the family, and the processor
    assert type(AutoModel.from_pretrained(checkpoint, trust_remote_code=True)).__name__ == encoder_name
    processor = AutoImageProcessor.from_pretrained(checkpoint, trust_remote_code=True)
    assert type(processor).__name__ == "CrateImageProcessor"
    """
)


@pytest.mark.parametrize("family", ["crate_vision", "tost_vision"])
def test_checkpoint_loads_with_trust_remote_code_without_this_package(family, tmp_path):
    if family == "crate_vision":
        model = tiny_model("tost", pooling="mean", patch_embedding_type="conv")
        names = ["CrateForImageClassification", "CrateVisionModel"]
    else:
        torch.manual_seed(0)
        model = ToSTForImageClassification(
            config_from_preset("tost-vision-tiny", image_size=16, num_channels=3, hidden_size=32, num_labels=5)
        ).eval()
        names = ["ToSTForImageClassification", "ToSTVisionModel"]
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    CrateImageProcessor(size={"height": 16, "width": 16}).save_pretrained(checkpoint)
    pixels = random_pixels(2, side=24)  # also exercises the interpolation in the copied code
    torch.save(pixels, tmp_path / "pixels.pt")
    script = tmp_path / "load.py"
    script.write_text(TRUST_REMOTE_CODE_SCRIPT)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run(
        [
            sys.executable,
            str(script),
            str(checkpoint),
            str(tmp_path / "pixels.pt"),
            str(tmp_path / "logits.pt"),
            *names,
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "logits.pt"), model(pixels).logits)


# ---------------------------------------------------------------------------------------------------- positions


def test_position_table_interpolation_and_resize(tmp_path):
    model = tiny_model()
    model.model.embeddings.position_embeddings.data.normal_()  # a table far from zero, so positions matter
    small, large = random_pixels(2, side=16), random_pixels(2, side=24)
    with torch.no_grad():
        before_small = model(small).logits
        on_the_fly = model(large).logits
    assert on_the_fly.shape == (2, 5)

    model.model.resize_position_embeddings(16)  # same size: the identity
    with torch.no_grad():
        assert torch.equal(model(small).logits, before_small)
    assert model.model.embeddings.position_embeddings.shape == (1, 17, 32)

    model.model.resize_position_embeddings(24)
    assert model.config.image_size == 24 and model.config.num_patches == 36
    assert model.model.embeddings.position_embeddings.shape == (1, 1 + 36, 32)
    assert model.model.embeddings.position_embeddings.requires_grad
    with torch.no_grad():
        resized = model(large).logits
    torch.testing.assert_close(resized, on_the_fly, rtol=1e-5, atol=1e-5)

    with pytest.raises(ValueError, match="patch_size"):
        model.model.resize_position_embeddings(30)
    assert model.config.image_size == 24

    model.save_pretrained(tmp_path)
    loaded = CrateForImageClassification.from_pretrained(tmp_path).eval()
    assert loaded.model.embeddings.position_embeddings.shape == (1, 37, 32)
    with torch.no_grad():
        assert torch.equal(loaded(large).logits, resized)


def test_interpolate_position_table():
    table = torch.randn(1, 1 + 16, 32)
    assert torch.equal(interpolate_position_table(table, (4, 4)), table)
    resized = interpolate_position_table(table, (6, 3))
    assert resized.shape == (1, 1 + 18, 32)
    assert torch.equal(resized[:, 0], table[:, 0])  # the CLS row is kept
    constant = torch.cat([table[:, :1], torch.full((1, 16, 32), 0.7)], dim=1)
    torch.testing.assert_close(interpolate_position_table(constant, (6, 6))[:, 1:], torch.full((1, 36, 32), 0.7))
    with pytest.raises(ValueError, match="square"):
        interpolate_position_table(torch.randn(1, 1 + 12, 32), (4, 4))
    # The same bicubic resampling as HF ViT's interpolate_pos_encoding (image 24 x 12, patch 4).
    vit_embeddings = tiny_vit().vit.embeddings
    with torch.no_grad():
        vit_embeddings.position_embeddings.copy_(table)
        from_vit = vit_embeddings.interpolate_pos_encoding(torch.zeros(1, 1 + 18, 32), 24, 12)
    torch.testing.assert_close(resized, from_vit, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- pipeline


def test_image_processor_and_pipeline(tmp_path):
    model = tiny_model(**labelled_config_overrides())
    model.save_pretrained(tmp_path)
    ViTImageProcessor(
        size={"shortest_edge": 16},
        do_center_crop=True,
        crop_size={"height": 16, "width": 16},
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    ).save_pretrained(tmp_path)
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (30, 20, 3), dtype=np.uint8))
    assert image.mode == "RGB" and image.size == (20, 30)
    pixels = processor(image, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 16, 16)
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0

    classifier = pipeline("image-classification", model=str(tmp_path))
    results = classifier(image, top_k=model.config.num_labels)
    assert len(results) == 5 and results[0]["label"] in LABELS
    assert {r["label"] for r in results} == set(LABELS)
    assert sum(r["score"] for r in results) == pytest.approx(1.0, abs=1e-4)
    with torch.no_grad():
        probabilities = model(pixels).logits.softmax(-1)[0]
    assert results[0]["label"] == LABELS[int(probabilities.argmax())]
    assert results[0]["score"] == pytest.approx(probabilities.max().item(), abs=1e-5)


def test_greyscale_model_with_its_image_processor(tmp_path):
    """A greyscale export carries ``CrateImageProcessor``: the pipeline hands it RGB (transformers' load_image), and
    the processor takes the luma exactly as PIL's ``convert("L")`` (the training pipeline's conversion) does."""
    model = tiny_model(num_channels=1)
    model.save_pretrained(tmp_path)
    CrateImageProcessor(
        num_channels=1,
        size={"shortest_edge": 16},
        do_center_crop=True,
        crop_size={"height": 16, "width": 16},
        image_mean=[0.5],
        image_std=[0.5],
    ).save_pretrained(tmp_path)
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(processor) is CrateImageProcessor
    rgb = Image.fromarray(np.random.RandomState(1).randint(0, 256, (30, 20, 3), dtype=np.uint8))
    grey = rgb.convert("L")
    pixels = processor(grey, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 1, 16, 16)
    assert torch.equal(processor(rgb, return_tensors="pt")["pixel_values"], pixels)
    with torch.no_grad():
        logits = model(pixels).logits
    assert logits.shape == (1, 5) and torch.isfinite(logits).all()
    results = pipeline("image-classification", model=str(tmp_path), trust_remote_code=False)(grey, top_k=5)
    assert results[0]["score"] == pytest.approx(logits.softmax(-1).max().item(), abs=1e-5)
    assert sum(r["score"] for r in results) == pytest.approx(1.0, abs=1e-4)


def test_image_processor_rejects_other_channel_counts():
    with pytest.raises(ValueError, match="num_channels"):
        CrateImageProcessor(num_channels=2)


# ---------------------------------------------------------------------------------------------------- white-box


@pytest.mark.parametrize("kind", ["crate", "crate-alpha", "tost", "vit"])
def test_measure_vision_gives_one_record_per_layer(kind):
    model = tiny_vit() if kind == "vit" else tiny_model(kind)
    model.train()
    records = measure_vision(model, random_pixels(3))
    assert model.training  # the training mode is restored
    assert [r["layer"] for r in records] == list(range(model.config.num_hidden_layers))
    for record in records:
        assert np.isfinite(record["rc"]) and record["rc"] > 0
        assert np.isfinite(record["delta_r"]) and np.isfinite(record["hoyer"])
        assert 0.0 <= record["sparsity_l0"] <= 1.0
        assert len(record["rc_per_head"]) == model.config.num_attention_heads
        if kind == "tost":
            assert 0.0 <= record["pi_entropy"] <= np.log(model.config.num_attention_heads) + 1e-9
        else:
            assert "pi_entropy" not in record
        if kind in ("crate", "crate-alpha"):
            assert record["sparsity_l0"] < 1.0  # ReLU codes hold exact zeros


@pytest.mark.parametrize("kind", ["crate", "tost", "vit"])
def test_cls_attention_maps(kind):
    model = tiny_vit() if kind == "vit" else tiny_model(kind)
    previous = getattr(model.config, "_attn_implementation", None)
    maps = cls_attention_maps(model, random_pixels(2))
    assert maps.shape == (2, 4, 4, 4)
    assert (maps >= 0).all() and (maps <= 1).all()
    assert getattr(model.config, "_attn_implementation", None) == previous
    if kind == "tost":
        # ToST's map is each patch's membership in the head: it sums to 1 over the heads, not over the patches.
        torch.testing.assert_close(maps.sum(1), torch.ones(2, 4, 4))
        return
    assert (maps.sum((-1, -2)) <= 1 + 1e-5).all()
    if kind == "crate":
        with torch.no_grad():
            weights = model.model(random_pixels(2), output_attentions=True).attentions[-1]
        torch.testing.assert_close(maps, weights[:, :, 0, 1:].reshape(2, 4, 4, 4))
        torch.testing.assert_close(maps.sum((-1, -2)), 1 - weights[:, :, 0, 0])
    if kind != "vit":  # HF ViT refuses other sizes unless interpolate_pos_encoding=True (not passed here)
        rectangular = cls_attention_maps(model, torch.randn(1, 3, 16, 24), layer=0)
        assert rectangular.shape == (1, 4, 4, 6)


# ---------------------------------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"num_channels": 2}, "num_channels"),
        ({"image_size": 30, "patch_size": 4}, "image_size"),
        ({"pooling": "max"}, "pooling"),
        ({"patch_embedding_type": "x"}, "patch_embedding_type"),
        ({"attention_type": "tssa", "ista_steps": 2}, "attention_type"),
        ({"hidden_size": 30}, "hidden_size"),
    ],
)
def test_bad_config_is_one_line_error_naming_the_field(overrides, field):
    with pytest.raises(ValueError) as error:
        config_from_preset("crate-vision-test", **overrides)
    message = str(error.value)
    assert f"CrateVisionConfig.{field}=" in message and "\n" not in message


def test_config_defaults_are_crate_t16():
    config = CrateVisionConfig()
    assert (
        config.image_size,
        config.patch_size,
        config.hidden_size,
        config.num_hidden_layers,
        config.num_attention_heads,
    ) == (224, 16, 384, 12, 6)
    assert config.variant == "crate" and config.causal_attention is False and config.num_patches == 196


# ---------------------------------------------------------------------------------------------------- training


def test_training_memorises_a_fixed_batch():
    model = tiny_model().train()
    pixels = random_pixels(8, seed=3)
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = model(pixels, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0], losses
