"""Build the model a run config names — a CRATE preset, CRATE size knobs, or the HF baseline built from the same
knobs (GPT-2 for text, ViT for images), or a pretrained HF checkpoint to fine-tune — and its AdamW parameter groups.
Plain ``PreTrainedModel``s: nothing here knows about distribution."""

from __future__ import annotations

from pathlib import Path
from types import MethodType

from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    PretrainedConfig,
)

import crate_lm
from crate_lm.modeling_crate_vision import interpolate_position_table
from launcher.architectures.registry import (
    SEQUENCE_CLASSIFICATION,
    Architecture,
    architecture,
    default_task,
    for_arch,
    model_types,
)
from launcher.config.run import LoraSection, ModelSection
from launcher.errors import ConfigError

SIZE_KNOBS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings", "vocab_size")
VISION_SIZE_KNOBS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "patch_size")


def _known_fields(config_class: type[PretrainedConfig]) -> set[str]:
    defaults = config_class()
    return set(vars(defaults)) | set(getattr(config_class, "attribute_map", {}))


def _check_overrides(section: ModelSection, config_class: type[PretrainedConfig]) -> None:
    known = _known_fields(config_class)
    for key in section.overrides:
        if key not in known:
            raise ConfigError(f"model.overrides.{key}: not a {config_class.__name__} field")


def _entry(section: ModelSection, modality: str) -> Architecture:
    entry = for_arch(section.arch, modality)
    if entry is None:  # the run config's own check names the data kind; this is its backstop
        raise ConfigError(f"model.arch: {section.arch} has no {modality} model")
    return entry


def _base_fields(section: ModelSection, entry: Architecture) -> dict:
    """The fields a config starts from: ``config_path``'s, a preset's (which must be of the entry's model type), or
    none."""
    if section.config_path:
        path = Path(section.config_path)
        return entry.config_class.from_pretrained(path if path.is_dir() else path.parent).to_dict()
    if not section.preset:
        return {}
    info = crate_lm.preset_info(section.preset)
    if info.get("model_type", "crate") != entry.model_type:
        kind, other = ("a vision", "text") if entry.modality == "text" else ("a language-model", "image")
        raise ConfigError(
            f"model.preset: {section.preset!r} is {kind} preset; {other} data takes "
            f"{crate_lm.preset_names(entry.model_type)}"
        )
    return info["config"]


def _pretrained_config(section: ModelSection) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(section.init_from)
    except (ValueError, OSError) as error:
        raise ConfigError(
            f"model.init_from: {section.init_from!r} is not a loadable HF checkpoint ({str(error).splitlines()[0]})"
        ) from None


def build_vision_config(
    section: ModelSection, image_size: int, channels: int, class_names: list[str]
) -> PretrainedConfig:
    """The HF config of an image classifier: CRATE (``CrateVisionConfig``) or the ViT baseline from the same knobs,
    or the ``init_from`` checkpoint's config with the run's classes and image size. The image size, channels and
    classes come from the data; one-line errors name the key."""
    for key in ("max_position_embeddings", "vocab_size"):
        if getattr(section, key) is not None:
            raise ConfigError(f"model.{key}: not used by image models (image_size and channels come from data)")
    labels = {
        "num_labels": len(class_names),
        "id2label": dict(enumerate(class_names)),
        "label2id": {name: index for index, name in enumerate(class_names)},
    }
    knobs = {k: getattr(section, k) for k in VISION_SIZE_KNOBS if getattr(section, k) is not None}
    shape = {"image_size": image_size, "num_channels": channels}
    try:
        if section.init_from:
            base = _pretrained_config(section)
            if base.model_type not in model_types("image"):
                raise ConfigError(
                    f"model.init_from: {section.init_from!r} is a {base.model_type!r} model, not an "
                    f"image model ({model_types('image')})"
                )
            if base.num_channels != channels:
                raise ConfigError(f"data.channels: {channels}, but the init_from model takes {base.num_channels}")
            if knobs:
                raise ConfigError(f"model.{next(iter(knobs))}: the size comes from init_from; leave it out")
            _check_overrides(section, type(base))
            return type(base)(**{**base.to_dict(), **section.overrides, **shape, **labels})
        entry = _entry(section, "image")
        _check_overrides(section, entry.config_class)
        base = _base_fields(section, entry)
        defaults = entry.baseline_defaults({**base, **knobs})
        return entry.config_class(**{**defaults, **base, **knobs, **section.overrides, **shape, **labels})
    except ValueError as error:
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(f"model: {str(error).splitlines()[0]}") from None


def build_model_config(
    section: ModelSection, vocab_size: int, eos_token_id: int | None, seq_len: int
) -> PretrainedConfig:
    """The HF config of the run's language model. ``vocab_size`` and ``eos_token_id`` come from the tokenizer
    unless the section sets them; one-line errors name the key."""
    if section.patch_size is not None:
        raise ConfigError("model.patch_size: applies to image models only")
    if section.init_from:
        base = _pretrained_config(section)
        if base.model_type not in model_types("text"):
            raise ConfigError(
                f"model.init_from: {section.init_from!r} is a {base.model_type!r} model, not a language model"
            )
        _check_overrides(section, type(base))
        config = type(base)(**{**base.to_dict(), **section.overrides})
        if config.vocab_size < vocab_size:
            raise ConfigError(
                f"tokenizer: {vocab_size} tokens, but the init_from model has vocab_size "
                f"{config.vocab_size}; use the checkpoint's tokenizer (tokenizer: {section.init_from})"
            )
        return config
    knobs = {k: getattr(section, k) for k in SIZE_KNOBS if getattr(section, k) is not None}
    knobs.setdefault("vocab_size", vocab_size)
    if eos_token_id is not None:
        knobs.update(bos_token_id=eos_token_id, eos_token_id=eos_token_id)
    entry = _entry(section, "text")
    _check_overrides(section, entry.config_class)
    try:
        base = _base_fields(section, entry)
        defaults = entry.baseline_defaults({**base, **knobs})
        config = entry.config_class(**{**defaults, **base, **knobs, **section.overrides})
    except (ValueError, OSError) as error:
        raise ConfigError(f"model: {str(error).splitlines()[0]}") from None
    if seq_len > config.max_position_embeddings:
        raise ConfigError(
            f"data.seq_len: {seq_len} exceeds the model's max_position_embeddings ({config.max_position_embeddings})"
        )
    if config.vocab_size < vocab_size:  # the tokenizer's ids would index past the embedding table
        raise ConfigError(
            f"model.vocab_size: {config.vocab_size} is smaller than the tokenizer's {vocab_size} tokens; "
            "leave it out to take the tokenizer's size"
        )
    return config


def build_classifier_config(
    section: ModelSection, vocab_size: int, tokenizer, label_names: tuple[str, ...], max_length: int
) -> PretrainedConfig:
    """The HF config of a text classifier: the ``init_from`` language model's (or the section's, for a classifier
    trained from scratch) with the run's labels and the tokenizer's pad token."""
    config = build_model_config(section, vocab_size, tokenizer.eos_token_id, max_length)
    labels = {
        "num_labels": len(label_names),
        "id2label": dict(enumerate(label_names)),
        "label2id": {name: index for index, name in enumerate(label_names)},
        "pad_token_id": tokenizer.pad_token_id,
    }
    if max_length > config.max_position_embeddings:
        raise ConfigError(
            f"data.max_length: {max_length} exceeds the model's max_position_embeddings "
            f"({config.max_position_embeddings})"
        )
    return type(config)(**{**config.to_dict(), **labels})


def build_model(config: PretrainedConfig, task: str | None = None) -> nn.Module:
    """A freshly initialised model for ``task`` (default: causal LM for text architectures, image classifier for
    image ones), of the class the architecture registry names."""
    return architecture(config.model_type).model_class(task or default_task(config.model_type))(config)


def load_pretrained_weights(model: nn.Module, path: str) -> str:
    """Copy the weights of the HF checkpoint at ``path`` into ``model`` (built by ``build_model`` from the config
    ``build_*_config`` derived from it) and return what happened to the head.

    Image classifiers: the backbone is copied (its position table interpolated to the model's patch grid when the
    image size changed); the classifier too when the label set is the checkpoint's ("kept"), otherwise it keeps
    its fresh initialisation ("new"). Text classifiers: the transformer of the checkpoint (a causal LM or a text
    classifier) is copied, the ``score`` head only from a classifier with the same labels. Language models: every
    weight is copied ("kept")."""
    entry = architecture(model.config.model_type)
    if entry.modality == "text" and isinstance(model, entry.model_classes.get(SEQUENCE_CLASSIFICATION, ())):
        saved_class = (AutoConfig.from_pretrained(path).architectures or [""])[0]
        is_classifier = saved_class.endswith("ForSequenceClassification")
        source = (AutoModelForSequenceClassification if is_classifier else AutoModelForCausalLM).from_pretrained(path)
        model.base_model.load_state_dict(source.base_model.state_dict())
        same_labels = is_classifier and dict(source.config.id2label) == dict(model.config.id2label)
        if same_labels:
            model.score.load_state_dict(source.score.state_dict())
        return "kept" if same_labels else "new"
    if entry.modality == "text":
        source = AutoModelForCausalLM.from_pretrained(path)
        model.load_state_dict(source.state_dict())
        return "kept"
    source = AutoModelForImageClassification.from_pretrained(path)
    state = source.base_model.state_dict()
    table = "embeddings.position_embeddings"  # CRATE and ViT; ToST vision's Fourier positions fit any grid
    if table in state:
        side = model.config.image_size // model.config.patch_size
        state[table] = interpolate_position_table(state[table], (side, side))
    result = model.base_model.load_state_dict(state, strict=False)
    if result.unexpected_keys or result.missing_keys:
        raise ConfigError(
            f"model.init_from: {path!r} does not fit the model (missing {result.missing_keys[:3]}, "
            f"unexpected {result.unexpected_keys[:3]})"
        )
    same_labels = source.config.num_labels == model.config.num_labels and dict(source.config.id2label) == dict(
        model.config.id2label
    )
    if same_labels:
        model.classifier.load_state_dict(source.classifier.state_dict())
    return "kept" if same_labels else "new"


def freeze_backbone(model: nn.Module) -> int:
    """Linear probe: only the classifier head (``classifier`` or ``score``) trains. The backbone's BatchNorms (ToST
    vision's stem) stay in eval mode, so the frozen features are those the evaluation sees and their running
    statistics do not drift. Returns the number of trainable parameters."""
    for name, parameter in model.named_parameters():
        parameter.requires_grad = name.startswith(("classifier.", "score."))
    for module in model.base_model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
            module.train = MethodType(_stay_in_eval, module)  # model.train() (the engine's) must not undo it
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _stay_in_eval(module: nn.Module, mode: bool = True) -> nn.Module:
    return module


PEFT_TASK_TYPES = {"causal-lm": "CAUSAL_LM", "sequence-classification": "SEQ_CLS"}


def apply_lora(model: nn.Module, section: LoraSection, task: str, init_from: str) -> nn.Module:
    """Wrap ``model`` (its pretrained weights loaded) in PEFT LoRA adapters: every original weight is frozen, the
    adapters train, and so does a classifier's head (``score`` / ``classifier``: PEFT's ``modules_to_save``). The
    adapter records ``init_from`` (absolute) as its base model. Adapter weights are drawn from the torch RNG, so
    equal seeds give equal adapters on every rank."""
    from peft import LoraConfig, get_peft_model

    heads = ["classifier"] if task == "image-classification" else None
    lora = LoraConfig(
        r=section.r,
        lora_alpha=section.alpha,
        lora_dropout=section.dropout,
        target_modules=section.target_modules,
        target_parameters=section.target_parameters,
        task_type=PEFT_TASK_TYPES.get(task),
        modules_to_save=heads,
    )
    model.name_or_path = str(Path(init_from).resolve())  # what PEFT records as the adapter's base model
    try:
        return get_peft_model(model, lora)
    except ValueError as error:  # e.g. target modules that match nothing
        key = "lora.target_parameters" if "parameter" in str(error).lower() else "lora.target_modules"
        raise ConfigError(f"{key}: {str(error).splitlines()[0]}") from None


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (adapters still attached); ``model`` itself otherwise."""
    return model.get_base_model() if hasattr(model, "peft_config") else model


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW's two groups: decayed matrices, and what the architecture's rule leaves undecayed (vectors such as
    norms and biases, embeddings and position tables, ToST's temperatures, position biases and LayerScales)."""
    entry = architecture(unwrap_peft(model).config.model_type)
    decay, plain = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (decay if entry.decays(name, parameter) else plain).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]
