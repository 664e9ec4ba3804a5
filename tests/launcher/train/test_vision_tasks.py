"""Image classification in the launcher, without a process group: configs, model building from knobs and from
checkpoints, mixup / cutmix, the exported image processor against the eval transform, FLOPs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from crate_lm import CrateForImageClassification, config_from_preset
from data_pipeline.fashion_mnist import export_fashion_mnist_folder, fashion_mnist
from data_pipeline.image_spec import parse_image_data
from data_pipeline.image_stream import eval_transform
from launcher.architectures.flops import image_tokens
from launcher.architectures.registry import forward_flops_per_token
from launcher.config.run import ModelSection, parse_run_config
from launcher.errors import ConfigError
from launcher.models.build import build_model, build_vision_config, freeze_backbone, load_pretrained_weights
from launcher.train.tasks import fixed_images, held_out_spec, image_processor_for, mix_batch

CLASSES = ["a", "b", "c"]


def run_config(**sections) -> dict:
    raw = {
        "output_dir": "/tmp/unused",
        "model": {"preset": "crate-vision-tiny"},
        "data": {"image_size": 28, "sources": ["fashion-mnist"]},
        "train": {"max_steps": 5},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return raw


# ---------------------------------------------------------------------------------------------------- config


def test_image_run_config_round_trips_and_defaults_to_the_test_split():
    config = parse_run_config(run_config(train={"max_steps": 5, "label_smoothing": 0.1, "mixup_alpha": 0.8}))
    assert config.is_image and config.data.channels == 1
    assert parse_run_config(config.to_dict()) == config
    held_out = held_out_spec(config)
    assert held_out.sources[0].split == "test" and held_out.train is False and held_out.image_size == 28


def test_eval_data_inherits_the_image_shape_and_normalisation(tmp_path):
    config = parse_run_config(
        run_config(data={"image_size": 32, "mean": [0.5], "std": [0.25]}, eval_data={"sources": ["fashion-mnist"]})
    )
    assert (config.eval_data.image_size, config.eval_data.mean, config.eval_data.std) == (32, (0.5,), (0.25,))
    assert config.eval_data.sources[0].split == "test" and not config.eval_data.train


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model": {"arch": "gpt2", "preset": None}}, "model.arch: gpt2 is a language model"),
        ({"model": {"linear_probe": True}}, "linear_probe trains a head on a pretrained backbone: set init_from"),
        ({"model": {"init_from": "x"}}, "at most one of preset, config_path and init_from"),
        ({"train": {"max_steps": 5, "label_smoothing": 1.0}}, "train.label_smoothing"),
        ({"eval_data": {"sources": ["fashion-mnist"], "image_size": 32}}, "eval_data.image_size (32) must equal"),
    ],
)
def test_bad_image_configs_fail_in_one_line(change, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as error:
        parse_run_config(run_config(**change))
    assert "\n" not in str(error.value)


def test_text_runs_refuse_vision_options():
    text = {"output_dir": "/tmp/x", "data": {"sources": ["tiny-shakespeare"], "seq_len": 64}, "train": {"max_steps": 5}}
    with pytest.raises(ConfigError, match="train.mixup_alpha: applies to image classification only"):
        parse_run_config({**text, "train": {"max_steps": 5, "mixup_alpha": 0.2}})
    with pytest.raises(ConfigError, match="model.arch: vit classifies images"):
        parse_run_config({**text, "model": {"arch": "vit"}})


def test_vision_config_from_knobs_presets_and_mismatches():
    crate = build_vision_config(ModelSection(preset="crate-vision-tiny"), 35, 1, CLASSES)
    assert (crate.model_type, crate.image_size, crate.num_channels, crate.num_labels) == ("crate_vision", 35, 1, 3)
    assert crate.id2label == {0: "a", 1: "b", 2: "c"} and crate.hidden_size == 96
    vit = build_vision_config(
        ModelSection(arch="vit", hidden_size=96, num_hidden_layers=4, num_attention_heads=4, patch_size=4),
        28,
        1,
        CLASSES,
    )
    assert (vit.model_type, vit.intermediate_size, vit.patch_size, vit.hidden_dropout_prob) == ("vit", 384, 4, 0.0)
    with pytest.raises(ConfigError, match="model.preset: 'crate-tiny' is a language-model preset"):
        build_vision_config(ModelSection(preset="crate-tiny"), 28, 1, CLASSES)
    with pytest.raises(ConfigError, match="model.vocab_size: not used by image models"):
        build_vision_config(ModelSection(vocab_size=100), 28, 1, CLASSES)
    with pytest.raises(ConfigError, match="model.overrides.nope: not a CrateVisionConfig field"):
        build_vision_config(ModelSection(overrides={"nope": 1}), 28, 1, CLASSES)
    with pytest.raises(ConfigError, match="image_size=30 is invalid: must be a multiple of patch_size=7"):
        build_vision_config(ModelSection(preset="crate-vision-tiny"), 30, 1, CLASSES)


# ---------------------------------------------------------------------------------------------------- init_from


def saved_model(path, **overrides):
    torch.manual_seed(0)
    model = CrateForImageClassification(config_from_preset("crate-vision-test", **overrides))
    model.save_pretrained(path)
    return model


def test_init_from_keeps_the_backbone_and_a_matching_head(tmp_path):
    source = saved_model(tmp_path, id2label={i: f"l{i}" for i in range(5)}, label2id={f"l{i}": i for i in range(5)})
    section = ModelSection(init_from=str(tmp_path))
    config = build_vision_config(section, 16, 3, [f"l{i}" for i in range(5)])
    model = build_model(config)
    assert load_pretrained_weights(model, str(tmp_path)) == "kept"
    for (name, mine), theirs in zip(model.state_dict().items(), source.state_dict().values()):
        assert torch.equal(mine, theirs), name


def test_init_from_with_new_labels_and_resolution_gets_a_new_head_and_interpolated_positions(tmp_path):
    source = saved_model(tmp_path)
    config = build_vision_config(ModelSection(init_from=str(tmp_path)), 24, 3, CLASSES)
    assert (config.image_size, config.num_labels, config.hidden_size) == (24, 3, source.config.hidden_size)
    torch.manual_seed(1)
    model = build_model(config)
    fresh_head = model.classifier.weight.clone()
    assert load_pretrained_weights(model, str(tmp_path)) == "new"
    assert torch.equal(model.classifier.weight, fresh_head)
    assert model.model.embeddings.position_embeddings.shape == (1, 1 + 36, source.config.hidden_size)
    source.model.resize_position_embeddings(24)
    pixels = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        assert torch.allclose(model.model(pixels).pooler_output, source.model(pixels).pooler_output, atol=1e-6)
    assert freeze_backbone(model) == 3 * source.config.hidden_size + 3
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["classifier.weight", "classifier.bias"]


def test_init_from_refuses_mismatches(tmp_path):
    saved_model(tmp_path)
    with pytest.raises(ConfigError, match="data.channels: 1, but the init_from model takes 3"):
        build_vision_config(ModelSection(init_from=str(tmp_path)), 16, 1, CLASSES)
    with pytest.raises(ConfigError, match="model.hidden_size: the size comes from init_from"):
        build_vision_config(ModelSection(init_from=str(tmp_path), hidden_size=64), 16, 3, CLASSES)
    with pytest.raises(ConfigError, match="model.init_from: .* is not a loadable HF checkpoint"):
        build_vision_config(ModelSection(init_from=str(tmp_path / "missing")), 16, 3, CLASSES)


# ---------------------------------------------------------------------------------------------------- mixing


def test_mix_batch_without_mixing_is_label_smoothing():
    pixels, labels = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 1])
    mixed, targets = mix_batch(pixels, labels, 3, 0.1, 0.0, 0.0, np.random.default_rng(0))
    assert mixed is pixels
    assert torch.allclose(targets[0], torch.tensor([0.9 + 0.1 / 3, 0.1 / 3, 0.1 / 3]))


@pytest.mark.parametrize("mixup, cutmix", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mix_batch_targets_follow_the_mixed_pixels(mixup, cutmix):
    pixels = torch.stack([torch.full((1, 8, 8), float(i)) for i in range(4)])
    labels = torch.arange(4)
    mixed, targets = mix_batch(pixels, labels, 4, 0.0, mixup, cutmix, np.random.default_rng(3))
    assert torch.allclose(targets.sum(-1), torch.ones(4))
    # Sample i mixes with sample 3 - i: its mean pixel value is lam * i + (1 - lam) * (3 - i), as its target says.
    expected = (targets * torch.arange(4.0)).sum(-1)
    assert torch.allclose(mixed.mean(dim=(1, 2, 3)), expected, atol=1e-5)
    again, same_targets = mix_batch(pixels, labels, 4, 0.0, mixup, cutmix, np.random.default_rng(3))
    assert torch.equal(again, mixed) and torch.equal(same_targets, targets)


# ---------------------------------------------------------------------------------------------------- processor


@pytest.mark.parametrize(
    "size, image_size", [((50, 40), 32), ((37, 39), 32), ((37, 43), 32), ((20, 30), 32), ((28, 28), 28)]
)
def test_exported_image_processor_reproduces_the_eval_transform(size, image_size):
    spec = parse_image_data({"image_size": image_size, "channels": 3, "sources": ["/tmp"], "train": False})
    image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    processed = image_processor_for(spec, size)(image, return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(processed, eval_transform(image, spec), atol=1e-5)


def test_greyscale_processor_reproduces_the_fashion_mnist_eval_images(tmp_path):
    spec = held_out_spec(parse_run_config(run_config()))
    pixels, labels = fixed_images(spec, 8)
    processor = image_processor_for(spec, (28, 28))
    images, all_labels = fashion_mnist("test")
    by_image = {np.asarray(images[i]).tobytes(): i for i in range(len(all_labels))}
    for pixel, label in zip(pixels, labels):
        raw = np.rint(pixel.numpy()[0] * spec.std[0] * 255 + spec.mean[0] * 255).astype(np.uint8)
        index = by_image[raw.tobytes()]
        assert all_labels[index] == label
        rgb = Image.fromarray(np.asarray(images[index])).convert("RGB")  # as a pipeline hands it over
        np.testing.assert_allclose(processor(rgb, return_tensors="np")["pixel_values"][0], pixel, atol=1e-5)


def test_fixed_images_are_capped_at_one_pass(tmp_path):
    counts = export_fashion_mnist_folder(tmp_path / "coarse", split="test", limit=30, coarse=True)
    assert sum(counts.values()) == 30 and set(counts) == {"tops", "bottoms-and-dresses", "footwear-and-bags"}
    spec = parse_image_data({"image_size": 28, "channels": 1, "sources": [str(tmp_path / "coarse")], "train": False})
    pixels, labels = fixed_images(spec, 100)
    assert pixels.shape == (30, 1, 28, 28) and sorted(labels.tolist()).count(2) == counts["tops"]


# ---------------------------------------------------------------------------------------------------- FLOPs


def test_vision_flops_count_layers_patches_and_head():
    crate = build_vision_config(ModelSection(preset="crate-vision-tiny"), 28, 1, CLASSES)
    vit = build_vision_config(
        ModelSection(arch="vit", hidden_size=96, num_hidden_layers=4, num_attention_heads=4, patch_size=7),
        28,
        1,
        CLASSES,
    )
    tokens, d = image_tokens(crate), 96
    assert tokens == 17
    edges = (2 * 49 * d * 16 + 2 * d * 3) / tokens
    # CRATE layer (4 d^2 projections + 4 T d attention + 4 d^2 ISTA: 17 tokens < 2d) vs ViT layer (24 d^2 + 4 T d).
    assert forward_flops_per_token(crate, tokens) == pytest.approx(4 * (8 * d * d + 4 * tokens * d) + edges)
    assert forward_flops_per_token(vit, tokens) == pytest.approx(4 * (24 * d * d + 4 * tokens * d) + edges)


@pytest.mark.parametrize(
    "workers, streams, device, expected",
    [
        ("auto", 4, "cpu", 0),  # on the CPU a worker would take a core from the training threads
        ("auto", 4, "cuda", 4),
        ("auto", 6, "cuda", 3),  # the largest divisor up to 4: each worker runs whole logical streams
        ("auto", 1, "cuda", 1),
        (2, 4, "cpu", 2),
    ],
)
def test_dataloader_workers_and_pinned_memory_follow_the_device(workers, streams, device, expected):
    from launcher.train.tasks import loader_options

    config = parse_run_config(
        run_config(
            data={"image_size": 28, "sources": ["fashion-mnist"], "streams_per_rank": streams},
            train={"max_steps": 5, "dataloader_workers": workers},
        ),
        "run.yaml",
    )
    options = loader_options(config, torch.device(device), streams)
    assert options == {"num_workers": expected, "pin_memory": device == "cuda"}
