"""The architecture registry: everything the launcher knows about a model architecture, in one entry.

An entry names the architecture's HF config class, its model class for each task it can train, how a baseline is
built from the run config's size knobs, its FLOPs, its white-box adapter, and its weight-decay and embedding rules.
Everything else — building the model (``launcher.models.build``), the run config's ``model.arch`` check
(``launcher.config.run``), MFU (``launcher.train``), ``crate compare``'s parameter and FLOP counts and ``crate
whitebox`` (``launcher.analysis``) — asks the registry, so **adding an architecture touches this file only**
(CONTRIBUTING.md has a worked example).

Entries are keyed by the HF ``model_type``. ``arch`` is the name a run config gives (``model.arch``); one ``arch``
may have one entry per modality (``crate`` is ``crate`` on text and ``crate_vision`` on images).

FLOPs: an entry with ``forward_flops`` (analytic, per token; ``launcher.architectures.flops``) reports MFU by the
published convention; an entry without one is counted exactly by ``torch.utils.flop_counter.FlopCounterMode`` on
the run's first training micro-step (forward and backward), so MFU works for any HF architecture nobody wrote a
formula for. ``tests/launcher/models/test_flops.py`` checks the formulas against the counter.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from transformers import (
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
    ViTConfig,
    ViTForImageClassification,
)

import crate_lm
from crate_lm import whitebox
from launcher.architectures import flops

CAUSAL_LM = "causal-lm"
SEQUENCE_CLASSIFICATION = "sequence-classification"
IMAGE_CLASSIFICATION = "image-classification"
TASKS = (CAUSAL_LM, SEQUENCE_CLASSIFICATION, IMAGE_CLASSIFICATION)

# Applied to every architecture before its own rule: norms, biases and other vectors are never decayed.
_VECTOR = 2


@dataclass(frozen=True)
class Architecture:
    """One trainable architecture.

    Args:
        model_type: the HF ``model_type`` (``config.model_type``), the registry key.
        arch: the run config's ``model.arch`` name.
        modality: ``"text"`` (token ids) or ``"image"`` (pixel values).
        config_class: its ``PretrainedConfig`` class.
        model_classes: task (``causal-lm``, ``sequence-classification``, ``image-classification``) -> model class.
        baseline_defaults: fields a model built from size knobs starts from, given the knobs (e.g. GPT-2 without
            dropout, as CRATE trains without it: a fair comparison).
        forward_flops: ``(config, seq_len, tokens_per_call) -> forward FLOPs per token``; ``None``: counted.
        whitebox: ``(model, inputs, attention_mask, eps_sq) -> per-layer rows`` (``crate_lm.whitebox``); ``None``: the
            architecture has no white-box measures.
        no_weight_decay: names of the matrices AdamW does not decay (embeddings, position tables, ...), searched in
            the parameter name; vectors (norms, biases) are never decayed whatever this says.
        embedding_parameters: names of the parameters left out of the non-embedding count (scaling plots).
        uses_presets: ``model.preset`` names a ``crate_lm`` preset of this ``model_type``.
        family: the family name ``crate compare`` groups runs by (default: ``model_type``).
    """

    model_type: str
    arch: str
    modality: Literal["text", "image"]
    config_class: type[PretrainedConfig]
    model_classes: Mapping[str, type[PreTrainedModel]]
    no_weight_decay: re.Pattern
    embedding_parameters: re.Pattern
    baseline_defaults: Callable[[dict], dict] = field(default=lambda knobs: {})
    forward_flops: Callable[..., float] | None = None
    whitebox: Callable[..., list[dict]] | None = None
    uses_presets: bool = False
    family: Callable[[PretrainedConfig], str] | None = None

    def model_class(self, task: str) -> type[PreTrainedModel]:
        if task not in self.model_classes:
            raise ValueError(f"{self.model_type} has no model for task {task!r}; it has {sorted(self.model_classes)}")
        return self.model_classes[task]

    def decays(self, name: str, parameter) -> bool:
        """Whether AdamW decays this parameter (named as in ``model.named_parameters()``)."""
        return parameter.ndim >= _VECTOR and not self.no_weight_decay.search(name)

    def family_of(self, config: PretrainedConfig) -> str:
        return self.family(config) if self.family else self.model_type


def _gpt2_defaults(knobs: dict) -> dict:
    return {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "attn_implementation": "sdpa"}


def _vit_defaults(knobs: dict) -> dict:
    # HF's ViT at the same width, depth, heads and patches, MLP 4x, no dropout (as CRATE).
    return {"intermediate_size": 4 * knobs.get("hidden_size", 768), "attn_implementation": "sdpa"}


def _llama_defaults(knobs: dict) -> dict:
    # Llama's SwiGLU MLP at 8/3 the width (rounded up to 64: the parameters of GPT-2's 4x MLP), tied embeddings as
    # CRATE and GPT-2 tie theirs, no dropout; rotary positions need no table.
    width = knobs.get("hidden_size", 4096)
    return {
        "intermediate_size": -(-8 * width // 3 // 64) * 64,
        "tie_word_embeddings": True,
        "attn_implementation": "sdpa",
    }


def _whitebox_text(measure):
    return lambda model, inputs, attention_mask=None, eps_sq=whitebox.DEFAULT_EPS_SQ: measure(
        model, inputs, attention_mask, eps_sq
    )


def _whitebox_image(model, inputs, attention_mask=None, eps_sq=whitebox.DEFAULT_EPS_SQ):
    return whitebox.measure_vision(model, inputs, eps_sq)


# ToST's per-head temperatures and position biases and its LayerScales are not decayed either.
_CRATE_EXTRAS = r"position_bias|temperature|\.scale$"

ARCHITECTURES: dict[str, Architecture] = {
    entry.model_type: entry
    for entry in (
        Architecture(
            model_type="crate",
            arch="crate",
            modality="text",
            config_class=crate_lm.CrateConfig,
            model_classes={
                CAUSAL_LM: crate_lm.CrateForCausalLM,
                SEQUENCE_CLASSIFICATION: crate_lm.CrateForSequenceClassification,
            },
            no_weight_decay=re.compile(rf"embed_tokens|embed_positions|{_CRATE_EXTRAS}"),
            embedding_parameters=re.compile(r"embed_tokens|position|lm_head"),
            forward_flops=flops.crate_forward_flops_per_token,
            whitebox=_whitebox_text(whitebox.measure_crate),
            uses_presets=True,
            family=crate_lm.configuration_crate.structural_variant,
        ),
        Architecture(
            model_type="gpt2",
            arch="gpt2",
            modality="text",
            config_class=GPT2Config,
            model_classes={CAUSAL_LM: GPT2LMHeadModel, SEQUENCE_CLASSIFICATION: GPT2ForSequenceClassification},
            no_weight_decay=re.compile(r"\bwte\.|\bwpe\."),
            embedding_parameters=re.compile(r"\bwte\b|\bwpe\b|lm_head"),
            baseline_defaults=_gpt2_defaults,
            forward_flops=flops.gpt2_forward_flops_per_token,
            whitebox=_whitebox_text(whitebox.measure_gpt2),
        ),
        Architecture(  # no FLOP formula: FLOPs are counted in the run
            model_type="llama",
            arch="llama",
            modality="text",
            config_class=LlamaConfig,
            model_classes={CAUSAL_LM: LlamaForCausalLM, SEQUENCE_CLASSIFICATION: LlamaForSequenceClassification},
            no_weight_decay=re.compile(r"embed_tokens"),
            embedding_parameters=re.compile(r"embed_tokens|lm_head"),
            baseline_defaults=_llama_defaults,
            whitebox=_whitebox_text(whitebox.measure_llama),
        ),
        Architecture(
            model_type="crate_vision",
            arch="crate",
            modality="image",
            config_class=crate_lm.CrateVisionConfig,
            model_classes={IMAGE_CLASSIFICATION: crate_lm.CrateForImageClassification},
            no_weight_decay=re.compile(rf"embeddings\.(cls_token|position_embeddings)|{_CRATE_EXTRAS}"),
            embedding_parameters=re.compile(r"position|cls_token"),
            forward_flops=flops.crate_vision_forward_flops_per_token,
            whitebox=_whitebox_image,
            uses_presets=True,
        ),
        Architecture(  # the official ToST image classifier; no FLOP formula: its FLOPs are counted in the run
            model_type="tost_vision",
            arch="tost",
            modality="image",
            config_class=crate_lm.ToSTVisionConfig,
            model_classes={IMAGE_CLASSIFICATION: crate_lm.ToSTForImageClassification},
            no_weight_decay=re.compile(rf"cls_token|{_CRATE_EXTRAS}"),
            embedding_parameters=re.compile(r"positions|cls_token"),
            whitebox=_whitebox_image,
            uses_presets=True,
        ),
        Architecture(
            model_type="vit",
            arch="vit",
            modality="image",
            config_class=ViTConfig,
            model_classes={IMAGE_CLASSIFICATION: ViTForImageClassification},
            no_weight_decay=re.compile(r"embeddings\.(cls_token|position_embeddings)"),
            embedding_parameters=re.compile(r"position|cls_token"),
            baseline_defaults=_vit_defaults,
            forward_flops=flops.vit_forward_flops_per_token,
            whitebox=_whitebox_image,
        ),
    )
}


# ----------------------------------------------------------------------------------------------------- look-ups


def architecture(model_type: str) -> Architecture:
    """The entry of an HF ``model_type``; a one-line error lists the known ones."""
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"model_type={model_type!r} is not a registered architecture: allowed values are {list(ARCHITECTURES)}"
        )
    return ARCHITECTURES[model_type]


def arch_names() -> list[str]:
    """The values a run config's ``model.arch`` may take."""
    return list(dict.fromkeys(entry.arch for entry in ARCHITECTURES.values()))


def preset_archs() -> list[str]:
    """The ``model.arch`` names whose ``model.preset`` names a ``crate_lm`` preset."""
    return list(dict.fromkeys(entry.arch for entry in ARCHITECTURES.values() if entry.uses_presets))


def archs_for(modality: str) -> list[str]:
    """The ``model.arch`` names that train on ``modality`` data (``text`` or ``image``)."""
    return [entry.arch for entry in ARCHITECTURES.values() if entry.modality == modality]


def for_arch(arch: str, modality: str) -> Architecture | None:
    """The entry a run's ``model.arch`` names on ``modality`` data, or ``None`` if that arch has none."""
    return next((entry for entry in ARCHITECTURES.values() if entry.arch == arch and entry.modality == modality), None)


def model_types(modality: str) -> list[str]:
    """The HF model types of ``modality`` (``text`` or ``image``)."""
    return [entry.model_type for entry in ARCHITECTURES.values() if entry.modality == modality]


def default_task(model_type: str) -> str:
    """The task a bare config of ``model_type`` is built for: causal LM for text, image classification for images."""
    return CAUSAL_LM if architecture(model_type).modality == "text" else IMAGE_CLASSIFICATION


# ----------------------------------------------------------------------------------------------------- FLOPs


def forward_flops_per_token(config, seq_len: int, tokens_per_call: int | None = None) -> float:
    """Analytic forward FLOPs per token of ``config``'s architecture (``ValueError`` if it has no formula)."""
    entry = architecture(config.model_type)
    if entry.forward_flops is None:
        raise ValueError(f"model_type={config.model_type!r} has no FLOP formula (its FLOPs are counted in the run)")
    return entry.forward_flops(config, seq_len, tokens_per_call)


def training_flops_per_token(config, seq_len: int, tokens_per_call: int | None = None) -> float | None:
    """Training FLOPs per token (three forward passes), or ``None`` when the architecture has no formula and the
    run counts them (``flops.count_flops``)."""
    if architecture(config.model_type).forward_flops is None:
        return None
    return 3 * forward_flops_per_token(config, seq_len, tokens_per_call)
