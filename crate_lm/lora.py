"""PEFT defaults for CRATE models, registered when ``crate_lm`` is imported.

PEFT picks LoRA's target modules from a table keyed by ``model_type``; with ``crate`` / ``crate_vision`` in it,
``LoraConfig(task_type=...)`` without ``target_modules`` works on our models as it does on GPT-2.

The default targets are the attention's two linear maps in every layer:

* ``subspace_proj`` -- ``[U_1 ... U_K]``, the bases of the K subspaces MSSA/TSSA compresses the tokens against
  (query, key and value at once: CRATE shares them), and
* ``out_proj`` -- the output map ``[U_1 ... U_K]`` of the multi-head subspace step.

``target_modules="all-linear"`` adds the MLP of ToST variants (``fc_in``, ``fc_out``); the output head is never
adapted (PEFT leaves it out), and a classifier's ``score`` / ``classifier`` head is trained whole
(``modules_to_save``, PEFT's default for sequence classification). The ISTA step's dictionary ``D`` is a parameter,
not an ``nn.Linear``, so no ``target_modules`` value reaches it: add ``target_parameters=["dictionary"]`` (LoRA on the
parameter, PEFT >= 0.17) to adapt the sparsification step too.
"""

from __future__ import annotations

LORA_TARGET_MODULES = ("subspace_proj", "out_proj")
ISTA_TARGET_PARAMETERS = ("dictionary",)


def register_peft_defaults() -> bool:
    """Add CRATE's default LoRA targets to PEFT's table (once; a user's own entry wins). False without PEFT."""
    try:
        from peft.utils import constants
    except ImportError:
        return False
    for model_type in ("crate", "crate_vision"):
        constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.setdefault(model_type, list(LORA_TARGET_MODULES))
    return True
