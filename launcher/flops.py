"""Analytic FLOPs of the language models, for throughput reports and MFU.

Matrix-multiply FLOPs per token of one forward pass (a multiply-add is 2 FLOPs), with ``T`` the sequence length,
``d`` the width, ``s`` the dictionary width, ``V`` the vocabulary:

* MSSA: the shared projection ``w = x U`` (2d^2) and the output projection (2d^2), plus attention scores and
  weighted sum, ``4 T d`` (counted over the full ``T x T`` square, the PaLM / nanoGPT convention).
* ISTA, one step (CRATE): ``D z`` and ``D^T r`` (4d^2) — or, when a call holds at least 2d tokens, the fused form
  the model then takes, one ``d x d`` matmul per token (2d^2) plus ``Delta = eta (D - D^T D)`` built once per call
  (2d^3, spread over the call's tokens). Two steps (CRATE-LM / alpha): ``D^T z``, ``D a1``,
  ``D^T r`` and the decoder ``D a2`` (8ds). A dictionary is used several times per token, so ``6 x params``
  would under-count CRATE; these formulas count every use.
* TSSA (ToST): projections (4d^2) and the GELU MLP (4 d * mlp_ratio * d); the token statistics are O(d) per token.
* GPT-2 layer: QKV (6d^2), output (2d^2), MLP (16d^2) and attention ``4 T d``.
* LM head: ``2 d V`` (the embedding lookup is free).

Training costs three forward passes (the backward pass is two).
"""

from __future__ import annotations


def crate_forward_flops_per_token(config, seq_len: int, tokens_per_call: int | None = None) -> float:
    """``tokens_per_call`` (micro-batch x sequence) decides the one-step ISTA form, as in ``CrateISTA``."""
    d, layers = config.hidden_size, config.num_hidden_layers
    if config.attention_type == "tssa":
        per_layer = 4 * d * d + 4 * d * config.mlp_ratio * d
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
        per_layer = 4 * d * d + 4 * seq_len * d + ista
    return layers * per_layer + 2 * d * config.vocab_size


def gpt2_forward_flops_per_token(config, seq_len: int, tokens_per_call: int | None = None) -> float:
    d, layers = config.n_embd, config.n_layer
    inner = config.n_inner or 4 * d
    per_layer = 8 * d * d + 4 * d * inner + 4 * seq_len * d
    return layers * per_layer + 2 * d * config.vocab_size


def forward_flops_per_token(config, seq_len: int, tokens_per_call: int | None = None) -> float:
    """Dispatch on ``config.model_type`` ("crate" or "gpt2")."""
    if config.model_type == "crate":
        return crate_forward_flops_per_token(config, seq_len, tokens_per_call)
    if config.model_type == "gpt2":
        return gpt2_forward_flops_per_token(config, seq_len, tokens_per_call)
    raise ValueError(f"model_type={config.model_type!r} has no FLOP formula: allowed values are ['crate', 'gpt2']")


def training_flops_per_token(config, seq_len: int, tokens_per_call: int | None = None) -> float:
    return 3 * forward_flops_per_token(config, seq_len, tokens_per_call)
