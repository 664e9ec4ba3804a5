"""Every run config shipped in configs/lm validates and builds its model; the published-size configs give the
published parameter counts and the published recipe (~0.5M tokens per step)."""

from pathlib import Path

import pytest
import torch

import crate_lm
from launcher.config.run import load_run_config
from launcher.models.build import build_model, build_model_config

CONFIGS = sorted(
    p for p in (Path(__file__).resolve().parents[3] / "configs" / "lm").rglob("*.yaml") if not p.name.startswith("_")
)
GPT2_VOCAB, GPT2_EOS = 50257, 50256


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_config_validates_and_builds(path):
    config = load_run_config(path)
    model_config = build_model_config(config.model, GPT2_VOCAB, GPT2_EOS, config.data.seq_len)
    with torch.device("meta"):
        model = build_model(model_config)
    if path.parent.name != "published":
        return
    assert config.data.seq_len * config.train.global_batch_size == 491_520  # nanoGPT's ~0.5M tokens per step
    assert config.optimizer.lr == 6e-4 and config.optimizer.warmup_steps == 2000 and config.train.max_steps == 600_000
    if config.model.arch == "crate":
        published = crate_lm.preset_info(config.model.preset).get("published_params")
        if published and path.stem != "crate-alpha-lm-base":  # its published 120M has no published shape
            assert crate_lm.count_parameters(model) == pytest.approx(published, rel=0.01)
    else:
        assert crate_lm.count_parameters(model) == pytest.approx(124e6, rel=0.01)
    # the GPU recipes' output layer has a multiple of 64 rows (GPT-2's 50257 -> 50304), as nanoGPT and llm.c train
    assert model.get_output_embeddings().weight.shape[0] % 64 == 0


VISION_CONFIGS = sorted(
    p
    for p in (Path(__file__).resolve().parents[3] / "configs" / "vision").rglob("*.yaml")
    if not p.name.startswith("_")
)
PUBLISHED_VIT_PARAMS = {192: 5.72e6, 384: 22.05e6}  # ViT-T/16, ViT-S/16 at 224^2, 1000 classes


@pytest.mark.parametrize("path", VISION_CONFIGS, ids=lambda p: p.stem)
def test_shipped_vision_config_validates_and_builds(path):
    from launcher.models.build import build_vision_config

    config = load_run_config(path)
    assert config.is_image
    if config.model.init_from:  # fine-tuning configs name a checkpoint made by another config
        assert config.model.init_from.startswith("runs/")
        return
    classes = [f"class_{i}" for i in range(config.data.num_classes or 10)]
    model_config = build_vision_config(config.model, config.data.image_size, config.data.channels, classes)
    with torch.device("meta"):
        params = sum(p.numel() for p in build_model(model_config).parameters())
    if path.parent.name != "published":
        return
    assert config.train.global_batch_size == 1024 and config.optimizer.lr == 1e-3  # DeiT's recipe
    assert (config.train.label_smoothing, config.train.mixup_alpha, config.train.cutmix_alpha) == (0.1, 0.8, 1.0)
    if config.model.arch == "crate":
        assert params == pytest.approx(crate_lm.preset_info(config.model.preset)["published_params"], rel=0.005)
    else:
        assert params == pytest.approx(PUBLISHED_VIT_PARAMS[model_config.hidden_size], rel=0.005)


TEXT_CONFIGS = sorted((Path(__file__).resolve().parents[3] / "configs" / "text").glob("*.yaml"))


@pytest.mark.parametrize("path", TEXT_CONFIGS, ids=lambda p: p.stem)
def test_shipped_fine_tuning_config_validates(path):
    config = load_run_config(path)
    assert config.task == "sequence-classification" and config.model.init_from
    if "lora" in path.stem:
        assert config.lora is not None and config.lora.target_parameters == ["dictionary"]
