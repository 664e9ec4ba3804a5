"""FLOPs of the architectures, for throughput reports and MFU: analytic formulas, and an exact counter.

Matrix-multiply FLOPs per token of one forward pass (a multiply-add is 2 FLOPs), with ``T`` the sequence length,
``d`` the width, ``s`` the dictionary width, ``V`` the vocabulary:

* MSSA: the shared projection ``w = x U`` (2d^2) and the output projection (2d^2; none without
  ``attention_out_projection``), plus attention scores and weighted sum, ``4 T d`` (counted over the full ``T x T``
  square, the PaLM / nanoGPT convention).
* ISTA, one step (CRATE): ``D z`` and ``D^T r`` (4d^2) — or, when a call holds at least 2d tokens, the fused form
  the model then takes, one ``d x d`` matmul per token (2d^2) plus ``Delta = eta (D - D^T D)`` built once per call
  (2d^3, spread over the call's tokens). Two steps (CRATE-LM / alpha): ``D^T z``, ``D a1``,
  ``D^T r`` and the decoder ``D a2`` (8ds). A dictionary is used several times per token, so ``6 x params``
  would under-count CRATE; these formulas count every use.
* TSSA (ToST): projections (4d^2, or 2d^2 without the output one) and the GELU MLP (4 d * mlp_ratio * d); the
  token statistics are O(d) per token.
* GPT-2 layer: QKV (6d^2), output (2d^2), MLP (16d^2) and attention ``4 T d``.
* LM head: ``2 d V`` with ``V`` the table's rows (``padded_vocab_size``: the padded rows are computed, then
  dropped from the logits); the embedding lookup is free.
* Vision (CRATE, ViT): the same layers over ``T = 1 + patches`` tokens, plus the patch embedding (``2 P^2 C d``
  per patch) and the classifier (``2 d classes`` per image), both spread over the image's T tokens.

Training costs three forward passes (the backward pass is two). The registry (``launcher.architectures.registry``)
maps each architecture to its formula; one without a formula is counted with [`count_flops`].
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def crate_layers_flops_per_token(config, seq_len: int, tokens_per_call: int | None = None) -> float:
    """The CRATE layers alone; ``tokens_per_call`` (micro-batch x sequence) decides the one-step ISTA form, as in
    ``CrateISTA``."""
    d, layers = config.hidden_size, config.num_hidden_layers
    projections = (4 if config.attention_out_projection else 2) * d * d
    if config.attention_type == "tssa":
        per_layer = projections + 4 * d * config.mlp_ratio * d
    else:
        s = config.dictionary_size
        if config.ista_steps == 2:
            ista = 8 * d * s
        elif tokens_per_call is not None and tokens_per_call >= 2 * d:
            ista = 2 * d * d + 2 * d**3 / tokens_per_call
        else:
            ista = 4 * d * s
        if config.ista_steps == 1 and config.ista_decoupled_decoder:
            ista += 2 * d * s
        per_layer = projections + 4 * seq_len * d + ista
    return layers * per_layer


def crate_forward_flops_per_token(config, seq_len: int, tokens_per_call: int | None = None) -> float:
    head = 2 * config.hidden_size * config.padded_vocab_size
    return crate_layers_flops_per_token(config, seq_len, tokens_per_call) + head


def _transformer_layers_flops_per_token(d: int, layers: int, inner: int, seq_len: int) -> float:
    return layers * (8 * d * d + 4 * d * inner + 4 * seq_len * d)


def gpt2_forward_flops_per_token(config, seq_len: int, tokens_per_call: int | None = None) -> float:
    layers = _transformer_layers_flops_per_token(
        config.n_embd, config.n_layer, config.n_inner or 4 * config.n_embd, seq_len
    )
    return layers + 2 * config.n_embd * config.vocab_size


def image_tokens(config) -> int:
    """Tokens of one image: the CLS token and the patches."""
    return 1 + (config.image_size // config.patch_size) ** 2


def _vision_edges_per_token(config) -> float:
    patches = image_tokens(config) - 1
    embedding = 2 * config.patch_size**2 * config.num_channels * config.hidden_size * patches
    return (embedding + 2 * config.hidden_size * config.num_labels) / image_tokens(config)


def crate_vision_forward_flops_per_token(
    config, seq_len: int | None = None, tokens_per_call: int | None = None
) -> float:
    seq_len = seq_len or image_tokens(config)
    return crate_layers_flops_per_token(config, seq_len, tokens_per_call) + _vision_edges_per_token(config)


def vit_forward_flops_per_token(config, seq_len: int | None = None, tokens_per_call: int | None = None) -> float:
    seq_len = seq_len or image_tokens(config)
    layers = _transformer_layers_flops_per_token(
        config.hidden_size, config.num_hidden_layers, config.intermediate_size, seq_len
    )
    return layers + _vision_edges_per_token(config)


def count_flops(run: Callable[[], T]) -> tuple[T, int]:
    """``run()``'s result and its FLOPs as torch's ``FlopCounterMode`` counts them (matrix multiplies, convolutions
    and attention kernels; a multiply-add is 2): exact for any model. The loop counts a training step of an
    architecture without a formula this way (frozen weights' missing gradients included)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    # torch's counter knows the CUDA attention kernels but not the CPU one SDPA dispatches to: without these a CPU
    # count would leave out attention (about 10% of a small model's FLOPs). Shapes in, FLOPs out, as torch's own.
    cpu_attention = {
        aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *args, out_shape=None, **kwargs: (
            sdpa_flop_count(q, k, v)
        ),
        aten._scaled_dot_product_flash_attention_for_cpu_backward: lambda grad, q, k, v, *args, out_shape=None, **kw: (
            sdpa_backward_flop_count(grad, q, k, v)
        ),
    }
    with FlopCounterMode(display=False, custom_mapping=cpu_attention) as counter:
        result = run()
    return result, counter.get_total_flops()


# Training FLOPs done with frozen weights, as a fraction of full training's (forward 1 : input gradients 1 : weight
# gradients 1): LoRA still back-propagates through every layer but computes no gradient of the frozen weights; a
# linear probe runs no backward through the backbone at all. The adapters' and head's own FLOPs are negligible.
FROZEN_FLOPS_FRACTION = {"lora": 2 / 3, "linear_probe": 1 / 3}


def frozen_flops_fraction(run_config) -> float:
    """The fraction of full training's FLOPs a run does (1 unless LoRA or a linear probe freezes weights)."""
    if getattr(run_config, "lora", None) is not None:
        return FROZEN_FLOPS_FRACTION["lora"]
    return FROZEN_FLOPS_FRACTION["linear_probe"] if run_config.model.linear_probe else 1.0
