"""Every run config shipped in configs/lm validates and builds its model; the published-size configs give the
published parameter counts and the published recipe (~0.5M tokens per step)."""

from pathlib import Path

import pytest
import torch

import crate_lm
from launcher.config import load_run_config
from launcher.models import build_model, build_model_config

CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[1] / "configs" / "lm").rglob("*.yaml")
                 if not p.name.startswith("_"))
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
