"""Named model presets: the published CRATE-family sizes and small ones for tests and CPU demos.

The presets are data (``presets.json`` beside this file); this module only reads them.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from torch import nn

from .configuration_crate import CrateConfig
from .configuration_crate_vision import CrateVisionConfig
from .configuration_tost_vision import ToSTVisionConfig

_CONFIG_CLASSES = {"crate": CrateConfig, "crate_vision": CrateVisionConfig, "tost_vision": ToSTVisionConfig}

PRESETS_FILE = Path(__file__).with_name("presets.json")


@lru_cache(maxsize=1)
def _load() -> dict[str, dict]:
    presets = json.loads(PRESETS_FILE.read_text())
    presets.pop("_about", None)
    return presets


def preset_names(model_type: str | None = None) -> list[str]:
    """All preset names, or those of one ``model_type`` (``"crate"`` language models, ``"crate_vision"``,
    ``"tost_vision"``)."""
    return sorted(
        name for name, info in _load().items() if model_type is None or info.get("model_type", "crate") == model_type
    )


def preset_info(name: str) -> dict:
    """The preset's record: ``description``, ``config`` and, for published models, ``published_params``."""
    presets = _load()
    if name not in presets:
        raise ValueError(f"unknown preset {name!r}: allowed values are {preset_names()}")
    return presets[name]


def config_from_preset(name: str, **overrides) -> CrateConfig | CrateVisionConfig | ToSTVisionConfig:
    """Build the preset's [`CrateConfig`] (or [`CrateVisionConfig`] / [`ToSTVisionConfig`] for a vision preset);
    ``overrides`` replace any of its fields (e.g. ``vocab_size``, ``num_labels``)."""
    info = preset_info(name)
    return _CONFIG_CLASSES[info.get("model_type", "crate")](**{**info["config"], **overrides})


def model_for_config(config: CrateConfig | CrateVisionConfig | ToSTVisionConfig) -> nn.Module:
    """The task model of a config: ``CrateForCausalLM``, ``CrateForImageClassification`` or
    ``ToSTForImageClassification``."""
    if config.model_type == "crate_vision":
        from .modeling_crate_vision import CrateForImageClassification

        return CrateForImageClassification(config)
    if config.model_type == "tost_vision":
        from .modeling_tost_vision import ToSTForImageClassification

        return ToSTForImageClassification(config)
    from .modeling_crate import CrateForCausalLM

    return CrateForCausalLM(config)


def count_parameters(model: nn.Module, exclude_position_embeddings: bool = True) -> int:
    """Parameters of ``model``, tied tensors counted once. Excluding the position table is nanoGPT's convention,
    the one the published CRATE/ToST language-model sizes use."""
    return sum(
        parameter.numel()
        for name, parameter in model.named_parameters(remove_duplicate=True)  # tied tensors appear once
        if not (exclude_position_embeddings and "embed_positions" in name)
    )
