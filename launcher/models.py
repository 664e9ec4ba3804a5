"""Build the model a run config names — a CRATE preset, CRATE size knobs, or the HF GPT-2 baseline built from the
same knobs — and its AdamW parameter groups. Plain ``PreTrainedModel``s: nothing here knows about distribution."""

from __future__ import annotations

from pathlib import Path

from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, PretrainedConfig

import crate_lm
from crate_lm import CrateConfig, CrateForCausalLM

from .config import ConfigError, ModelSection

SIZE_KNOBS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings", "vocab_size")


def _known_fields(config_class: type[PretrainedConfig]) -> set[str]:
    defaults = config_class()
    return set(vars(defaults)) | set(getattr(config_class, "attribute_map", {}))


def build_model_config(section: ModelSection, vocab_size: int, eos_token_id: int | None,
                       seq_len: int) -> PretrainedConfig:
    """The HF config of the run's model. ``vocab_size`` and ``eos_token_id`` come from the tokenizer unless the
    section sets them; one-line errors name the key."""
    knobs = {k: getattr(section, k) for k in SIZE_KNOBS if getattr(section, k) is not None}
    knobs.setdefault("vocab_size", vocab_size)
    if eos_token_id is not None:
        knobs.update(bos_token_id=eos_token_id, eos_token_id=eos_token_id)
    config_class = CrateConfig if section.arch == "crate" else GPT2Config
    known = _known_fields(config_class)
    for key in section.overrides:
        if key not in known:
            raise ConfigError(f"model.overrides.{key}: not a {config_class.__name__} field")
    try:
        if section.config_path:
            path = Path(section.config_path)
            base = config_class.from_pretrained(path if path.is_dir() else path.parent).to_dict()
        elif section.preset:
            base = crate_lm.preset_info(section.preset)["config"]
        else:
            base = {}
        if section.arch == "crate":
            config = CrateConfig(**{**base, **knobs, **section.overrides})
        else:
            # The baseline keeps GPT-2's shape and drops dropout, as CRATE trains without it: a fair comparison.
            defaults = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "attn_implementation": "sdpa"}
            config = GPT2Config(**{**defaults, **base, **knobs, **section.overrides})
    except (ValueError, OSError) as error:
        raise ConfigError(f"model: {str(error).splitlines()[0]}") from None
    if seq_len > config.max_position_embeddings:
        raise ConfigError(f"data.seq_len: {seq_len} exceeds the model's max_position_embeddings "
                          f"({config.max_position_embeddings})")
    return config


def build_model(config: PretrainedConfig) -> nn.Module:
    return CrateForCausalLM(config) if config.model_type == "crate" else GPT2LMHeadModel(config)


def no_weight_decay(name: str, parameter: nn.Parameter) -> bool:
    """Norms, biases, embeddings and ToST's temperatures / position biases / LayerScales are not decayed."""
    return (parameter.ndim < 2 or "embed" in name or name.startswith(("transformer.wte", "transformer.wpe"))
            or name.endswith(("position_bias", "temperature", ".scale")))


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, plain = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (plain if no_weight_decay(name, parameter) else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]
