"""crate_lm: CRATE-family white-box transformers as native HuggingFace models.

Importing this package registers the models with the ``Auto*`` classes and marks them so that ``save_pretrained``
writes the configuration and modeling code (and ``auto_map``) next to the weights: a checkpoint then also loads in
a plain ``transformers`` install with ``trust_remote_code=True``.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)

from .configuration_crate import VARIANT_KNOBS, CrateConfig
from .modeling_crate import (
    CrateCache,
    CrateForCausalLM,
    CrateForSequenceClassification,
    CrateModel,
    CratePreTrainedModel,
)
from .presets import config_from_preset, count_parameters, preset_info, preset_names

AutoConfig.register(CrateConfig.model_type, CrateConfig, exist_ok=True)
AutoModel.register(CrateConfig, CrateModel, exist_ok=True)
AutoModelForCausalLM.register(CrateConfig, CrateForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(CrateConfig, CrateForSequenceClassification, exist_ok=True)

CrateConfig.register_for_auto_class()
CrateModel.register_for_auto_class("AutoModel")
CrateForCausalLM.register_for_auto_class("AutoModelForCausalLM")
CrateForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")

__version__ = "0.1.0"

__all__ = [
    "CrateCache",
    "CrateConfig",
    "CrateForCausalLM",
    "CrateForSequenceClassification",
    "CrateModel",
    "CratePreTrainedModel",
    "VARIANT_KNOBS",
    "config_from_preset",
    "count_parameters",
    "preset_info",
    "preset_names",
]
