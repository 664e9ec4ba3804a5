"""crate_lm: CRATE-family white-box transformers as native HuggingFace models.

Importing this package registers the models with the ``Auto*`` classes and marks them so that ``save_pretrained``
writes the configuration and modeling code (and ``auto_map``) next to the weights: a checkpoint then also loads in
a plain ``transformers`` install with ``trust_remote_code=True``.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
)

from .configuration_crate import VARIANT_KNOBS, CrateConfig
from .configuration_crate_vision import CrateVisionConfig
from .configuration_tost_vision import ToSTVisionConfig
from .image_processing_crate import CrateImageProcessor
from .lora import ISTA_TARGET_PARAMETERS, LORA_TARGET_MODULES, register_peft_defaults
from .modeling_crate import (
    CrateCache,
    CrateForCausalLM,
    CrateForSequenceClassification,
    CrateModel,
    CratePreTrainedModel,
)
from .modeling_crate_vision import (
    CrateForImageClassification,
    CrateVisionModel,
    CrateVisionPreTrainedModel,
    interpolate_position_table,
)
from .modeling_tost_vision import ToSTForImageClassification, ToSTVisionModel, ToSTVisionPreTrainedModel
from .presets import config_from_preset, count_parameters, model_for_config, preset_info, preset_names

AutoConfig.register(CrateConfig.model_type, CrateConfig, exist_ok=True)
AutoModel.register(CrateConfig, CrateModel, exist_ok=True)
AutoModelForCausalLM.register(CrateConfig, CrateForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(CrateConfig, CrateForSequenceClassification, exist_ok=True)
AutoConfig.register(CrateVisionConfig.model_type, CrateVisionConfig, exist_ok=True)
AutoModel.register(CrateVisionConfig, CrateVisionModel, exist_ok=True)
AutoModelForImageClassification.register(CrateVisionConfig, CrateForImageClassification, exist_ok=True)
AutoImageProcessor.register(CrateVisionConfig, image_processor_classes={"pil": CrateImageProcessor}, exist_ok=True)
AutoConfig.register(ToSTVisionConfig.model_type, ToSTVisionConfig, exist_ok=True)
AutoModel.register(ToSTVisionConfig, ToSTVisionModel, exist_ok=True)
AutoModelForImageClassification.register(ToSTVisionConfig, ToSTForImageClassification, exist_ok=True)
AutoImageProcessor.register(ToSTVisionConfig, image_processor_classes={"pil": CrateImageProcessor}, exist_ok=True)

CrateConfig.register_for_auto_class()
CrateModel.register_for_auto_class("AutoModel")
CrateForCausalLM.register_for_auto_class("AutoModelForCausalLM")
CrateForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
CrateVisionConfig.register_for_auto_class()
CrateVisionModel.register_for_auto_class("AutoModel")
CrateForImageClassification.register_for_auto_class("AutoModelForImageClassification")
ToSTVisionConfig.register_for_auto_class()
ToSTVisionModel.register_for_auto_class("AutoModel")
ToSTForImageClassification.register_for_auto_class("AutoModelForImageClassification")
CrateImageProcessor.register_for_auto_class("AutoImageProcessor")

register_peft_defaults()

__version__ = "0.1.0"

__all__ = [
    "CrateCache",
    "CrateConfig",
    "CrateForCausalLM",
    "CrateForImageClassification",
    "CrateForSequenceClassification",
    "CrateImageProcessor",
    "CrateModel",
    "CrateVisionConfig",
    "CrateVisionModel",
    "CrateVisionPreTrainedModel",
    "CratePreTrainedModel",
    "ISTA_TARGET_PARAMETERS",
    "LORA_TARGET_MODULES",
    "ToSTForImageClassification",
    "ToSTVisionConfig",
    "ToSTVisionModel",
    "ToSTVisionPreTrainedModel",
    "VARIANT_KNOBS",
    "config_from_preset",
    "count_parameters",
    "interpolate_position_table",
    "model_for_config",
    "preset_info",
    "preset_names",
    "register_peft_defaults",
]
