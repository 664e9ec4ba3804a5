"""CRATE language models as HuggingFace ``PreTrainedModel``s.

A CRATE layer is one step of alternating optimisation of the sparse rate reduction objective
``max E[ R(Z) - R^c(Z | U_[K]) - lambda ||Z||_0 ]``: a gradient step on the compression term ``R^c`` (which unrolls
into multi-head subspace self-attention, MSSA) followed by a proximal step towards a sparse code against a learned
dictionary (which unrolls into the ISTA block). ToST replaces MSSA by token-statistics self-attention (TSSA), a
linear-time operator derived from a variational form of ``R^c``, and keeps a GELU MLP.

Skeleton (GPT-2's, as in every released CRATE LM): learned absolute positions, pre-LN, tied input embedding and LM
head, and a final LN unless ``final_layer_norm=False`` (the released Causal-CRATE has none). The embedding table may
be padded (``vocab_pad_multiple``); the logits keep the tokenizer's ``vocab_size`` columns.

Tokens are rows: hidden states are ``(batch, tokens, d)``; heads are ``K`` subspaces of size ``p = d / K``.

This file is copied into every saved checkpoint for ``trust_remote_code`` loading, so it imports only torch,
transformers and the configuration file beside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
)
from transformers.modeling_utils import PreTrainedModel

from .configuration_crate import CrateConfig

# ----------------------------------------------------------------------------------------------------------------------
# Cache: one tensor per MSSA layer, a constant-size running state per TSSA layer
# ----------------------------------------------------------------------------------------------------------------------


class MSSACacheLayer(CacheLayerMixin):
    """Cache of one MSSA layer: the shared projection ``w = x U`` of past tokens, ``(batch, heads, tokens, p)``.

    Because MSSA uses ``w`` as query, key *and* value, only this one tensor is stored (GPT-2 stores keys and
    values). ``keys`` and ``values`` are the same tensor object, kept for the ``Cache`` API.
    """

    is_croppable = True
    is_sliding = False

    def __init__(self, **kwargs):
        self._set(None)
        self.is_initialized = False

    def _set(self, projections: torch.Tensor | None) -> None:
        self.keys = self.values = projections

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor | None = None) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states=None, *args, **kwargs):
        if not self.is_initialized or self.keys is None:
            self.lazy_initialization(key_states)
            self._set(key_states)
        else:
            self._set(torch.cat([self.keys, key_states], dim=-2))
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def get_max_length(self) -> int:
        return -1

    def offload(self):
        if self.keys is not None:
            self._set(self.keys.to("cpu", non_blocking=True))

    def prefetch(self):
        if self.keys is not None and self.keys.device != self.device:
            self._set(self.keys.to(self.device, non_blocking=True))

    def reset(self) -> None:
        self._set(None)
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.keys is not None:
            self._set(self.keys.index_select(0, beam_idx.to(self.keys.device)))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        if tokens_to_remove and self.keys is not None:
            self._set(self.keys[..., :tokens_to_remove, :])

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.keys is not None:
            self._set(self.keys.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.keys is not None:
            self._set(self.keys[indices, ...])

    def state_tensors(self) -> list[torch.Tensor]:
        return [] if self.keys is None else [self.keys]


class TSSACacheLayer(CacheLayerMixin):
    """Running state of one causal TSSA layer; its size does not grow with the number of tokens.

    Holds, summed over every past token (all in float32): ``sum_sq = sum_n w_n^2`` (B, K, p) for the normalisation of
    the membership logits, ``sum_pi = sum_n Pi_n`` (B, K) and ``sum_pi_sq = sum_n Pi_n w_n^2`` (B, K, p) for the
    second moment. A running state cannot be rolled back, so the layer is not croppable.
    """

    is_croppable = False
    is_sliding = False

    def __init__(self, **kwargs):
        self.keys = self.values = None
        self.sum_sq = self.sum_pi = self.sum_pi_sq = None
        self.seen_tokens = 0
        self.is_initialized = False

    def lazy_initialization(self, key_states=None, value_states=None) -> None:
        self.is_initialized = True

    def update(self, *args, **kwargs):
        raise NotImplementedError("TSSA layers keep running statistics: use update_statistics()")

    def update_statistics(self, sum_sq, sum_pi, sum_pi_sq, new_tokens: int) -> None:
        self.sum_sq, self.sum_pi, self.sum_pi_sq = sum_sq, sum_pi, sum_pi_sq
        self.seen_tokens += new_tokens
        self.device = sum_sq.device
        self.is_initialized = True

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_max_length(self) -> int:
        return -1

    def _map(self, fn) -> None:
        if self.sum_sq is not None:
            self.sum_sq, self.sum_pi, self.sum_pi_sq = (fn(t) for t in (self.sum_sq, self.sum_pi, self.sum_pi_sq))

    def offload(self):
        self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self):
        if self.sum_sq is not None:
            self._map(lambda t: t.to(self.device, non_blocking=True))

    def reset(self) -> None:
        self.sum_sq = self.sum_pi = self.sum_pi_sq = None
        self.seen_tokens = 0
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise ValueError("a TSSA running state cannot be cropped (ToST does not support assisted generation)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices, ...])

    def state_tensors(self) -> list[torch.Tensor]:
        return [] if self.sum_sq is None else [self.sum_sq, self.sum_pi, self.sum_pi_sq]


class CrateCache(Cache):
    """Generation cache of a CRATE model: an [`MSSACacheLayer`] or a [`TSSACacheLayer`] per layer."""

    def __init__(self, config: CrateConfig):
        layer_class = TSSACacheLayer if config.attention_type == "tssa" else MSSACacheLayer
        super().__init__(layers=[layer_class() for _ in range(config.num_hidden_layers)])

    def nbytes(self) -> int:
        """Bytes held by the cache (each distinct storage counted once)."""
        seen, total = set(), 0
        for layer in self.layers:
            for tensor in layer.state_tensors():
                key = tensor.untyped_storage().data_ptr()
                if key not in seen:
                    seen.add(key)
                    total += tensor.untyped_storage().nbytes()
        return total


# ----------------------------------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------------------------------


def _residual_output(linear: nn.Linear) -> nn.Linear:
    """Mark the output projection of a residual branch, whose init is scaled by depth (see ``_init_weights``)."""
    linear._residual_branch_output = True
    return linear


def _attention_output(config: CrateConfig) -> nn.Linear | None:
    """The attention's output projection ``U_out`` (``None`` with ``attention_out_projection=False``)."""
    if not config.attention_out_projection:
        return None
    return _residual_output(nn.Linear(config.hidden_size, config.hidden_size, bias=config.attention_out_bias))


def _layer_norm(config: CrateConfig, eps: float | None = None) -> nn.LayerNorm:
    """A LayerNorm over the hidden size: the block norms' eps unless ``eps`` is given, bias per ``layer_norm_bias``."""
    return nn.LayerNorm(
        config.hidden_size, eps=config.layer_norm_eps if eps is None else eps, bias=config.layer_norm_bias
    )


class CrateMSSA(nn.Module):
    r"""Multi-head subspace self-attention: a gradient step on the compression term ``R^c(Z | U_[K])``.

    With ``w_k = x U_k`` (one projection per head serving as query, key **and** value)::

        MSSA(x) = U_out [ softmax(w_1 w_1^T / sqrt(p)) w_1, ..., softmax(w_K w_K^T / sqrt(p)) w_K ] + b_out

    with a causal mask for language models (none for vision: ``config.causal_attention``). Because ``q = k = v`` this
    is exactly ``scaled_dot_product_attention(w, w, w)``, and a KV cache stores the single tensor ``w``. Without
    ``attention_out_projection`` the concatenated heads are the output (``U_out = I``, no bias).
    """

    def __init__(self, config: CrateConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.causal = config.causal_attention
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.subspace_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)  # [U_1 ... U_K]
        self.out_proj = _attention_output(config)
        self.attention_dropout = config.attention_dropout

    def forward(self, hidden_states, attention_mask=None, cache=None, output_attentions=False, **unused):
        batch, tokens, _ = hidden_states.shape
        w = self.subspace_proj(hidden_states).view(batch, tokens, self.num_heads, self.head_dim).transpose(1, 2)
        context = cache.update(w, None, self.layer_idx)[0] if cache is not None else w
        dropout = self.attention_dropout if self.training else 0.0
        weights = None
        if output_attentions:
            scores = torch.matmul(w, context.transpose(-1, -2)) / math.sqrt(self.head_dim)
            if attention_mask is None and self.causal:
                attention_mask = _causal_bool_mask(tokens, context.shape[-2], w.device)
            if attention_mask is not None:
                scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
            weights = F.dropout(scores.softmax(dim=-1), dropout, self.training)
            out = torch.matmul(weights, context)
        else:
            # No mask given means plain causal attention over the whole key range (language models).
            is_causal = self.causal and attention_mask is None and tokens > 1 and tokens == context.shape[-2]
            if self.causal and attention_mask is None and tokens > 1 and not is_causal:  # chunked prefill + cache
                attention_mask = _causal_bool_mask(tokens, context.shape[-2], w.device)
            out = F.scaled_dot_product_attention(
                w, context, context, attn_mask=attention_mask, dropout_p=dropout, is_causal=is_causal
            )
        out = out.transpose(1, 2).reshape(batch, tokens, -1)
        return (out if self.out_proj is None else self.out_proj(out)), weights, w


class CrateTSSA(nn.Module):
    r"""Causal token-statistics self-attention (ToST): a gradient step on a variational form of ``R^c``.

    Per head ``k`` with ``w = x U_k`` and running (causal) sums over positions ``m <= n``, all in float32::

        Pi_n   = softmax_over_heads( tau_k * sum_p ( w_n^2 / sum_{m<=n} w_m^2 + b_{k,n} ) )
        mom_n  = sum_{m<=n} Pi_m w_m^2 / sum_{m<=n} Pi_m
        TSSA(x)_n = U_out [ -(Pi_n * w_n) / (1 + mom_n) ]_{k=1..K}

    ``tau`` (one temperature per head) and ``b`` (a per-position bias, as in the official causal ToST LM) are
    learned. No ``N x N`` matrix is formed: time O(pN) and memory O(p) per head, and generation carries only the
    running sums (see [`TSSACacheLayer`]). Padding tokens (``attention_mask == 0``) contribute nothing to the sums.

    Vision (``config.causal_attention`` false) takes the sums over all ``N`` tokens instead of ``m <= n``, without
    the position bias: the official vision ToST.
    """

    def __init__(self, config: CrateConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.causal = config.causal_attention
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.subspace_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.subspace_bias)
        self.out_proj = _attention_output(config)
        self.temperature = nn.Parameter(torch.ones(self.num_heads))
        self.position_bias = (
            nn.Parameter(torch.zeros(self.num_heads, config.max_position_embeddings))
            if config.tssa_position_bias
            else None
        )

    def forward(self, hidden_states, position_ids, token_mask=None, cache=None, **unused):
        batch, tokens, _ = hidden_states.shape
        w = self.subspace_proj(hidden_states).view(batch, tokens, self.num_heads, self.head_dim).transpose(1, 2)
        w32 = w.float()
        if token_mask is not None:
            w32 = w32 * token_mask[:, None, :, None]
        w_sq = w32.square()

        state = cache.layers[self.layer_idx] if cache is not None else None
        has_past = state is not None and state.sum_sq is not None
        # Causal: running sums over positions m <= n; vision: one sum over all tokens (broadcast over n).
        running_sum = (lambda t: t.cumsum(dim=2)) if self.causal else (lambda t: t.sum(dim=2, keepdim=True))
        cum_sq = running_sum(w_sq)
        if has_past:
            cum_sq = cum_sq + state.sum_sq[:, :, None]
        logits = (w_sq / cum_sq.clamp_min(1e-12)).sum(dim=-1)  # (B, K, N)
        if self.position_bias is not None:
            # b is summed over the p coordinates of the head, as in the official code.
            logits = logits + self.head_dim * self.position_bias.float()[:, position_ids].permute(1, 0, 2)
        membership = torch.softmax(logits * self.temperature.float()[None, :, None], dim=1)
        if token_mask is not None:
            membership = membership * token_mask[:, None, :]

        cum_pi = running_sum(membership)
        cum_pi_sq = running_sum(w_sq * membership[..., None])
        if has_past:
            cum_pi = cum_pi + state.sum_pi[:, :, None]
            cum_pi_sq = cum_pi_sq + state.sum_pi_sq[:, :, None]
        second_moment = cum_pi_sq / (cum_pi[..., None] + 1e-8)
        out = -(w32 * membership[..., None]) / (1.0 + second_moment)
        if state is not None:
            state.update_statistics(cum_sq[:, :, -1], cum_pi[:, :, -1], cum_pi_sq[:, :, -1], tokens)

        out = out.to(hidden_states.dtype).transpose(1, 2).reshape(batch, tokens, -1)
        return (out if self.out_proj is None else self.out_proj(out)), membership, w


class CrateISTA(nn.Module):
    r"""The sparsification step: proximal gradient on the non-negative LASSO
    ``min_{a >= 0} lambda ||a||_1 + 1/2 ||z - D a||^2`` with ``z = LN(z_half)``, step ``eta`` (constants).

    * one step, complete dictionary (CRATE), warm-started at ``a = z``::

          a = ReLU(z + eta D^T (z - D z) - eta lambda)                      output: a

    * two steps from zero, dictionary ``D`` of width ``s = ratio * d`` (CRATE-LM, CRATE-alpha)::

          a1 = ReLU(eta D^T z - eta lambda)
          a2 = ReLU(a1 + eta D^T (z - D a1) - eta lambda)                    output: D a2  (or D1 a2, decoupled)

    The layer output is the ISTA output (no residual) unless ``ista_residual``: then ``z_half + D1 a2``
    (CRATE-alpha). ``forward`` returns the decoded output and the sparse code ``a`` (the "neurons").
    """

    def __init__(self, config: CrateConfig):
        super().__init__()
        self.steps = config.ista_steps
        self.step_size = config.ista_step_size
        self.threshold = config.ista_step_size * config.ista_lambda
        self.dictionary = nn.Parameter(torch.empty(config.hidden_size, config.dictionary_size))  # D
        self.decoder = (
            nn.Parameter(torch.empty(config.hidden_size, config.dictionary_size))  # D1
            if config.ista_decoupled_decoder
            else None
        )
        # The complete one-step CRATE returns the code itself; every other form decodes it back to width d.
        self.decodes = self.steps == 2 or self.decoder is not None

    def proximal_step(self, z: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        """One ISTA step from ``code``: ``ReLU(code + eta D^T (z - D code) - eta lambda)`` (rows are tokens)."""
        residual = z - F.linear(code, self.dictionary)  # z - D a
        return F.relu(code + self.step_size * F.linear(residual, self.dictionary.t()) - self.threshold)

    def warm_start_step(self, z: torch.Tensor) -> torch.Tensor:
        """The one warm-started step with one matmul per token instead of two.

        ``z + eta D^T (z - D z) = (I + eta D^T (I - D)) z``; with tokens as rows this is ``z + z Delta``,
        ``Delta = eta (D - D^T D)``. Building ``Delta`` costs ``2 d^3`` once per call, so it pays off when a call
        holds more than about ``2 d`` tokens (training, prefill); short calls (decoding) take the direct form.
        """
        tokens = z.numel() // z.shape[-1]
        if tokens < 2 * z.shape[-1]:
            return self.proximal_step(z, z)
        dictionary = self.dictionary.float()
        delta = self.step_size * (dictionary - dictionary.t() @ dictionary)
        return F.relu(z + torch.matmul(z, delta.to(z.dtype)) - self.threshold)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.steps == 1:
            code = self.warm_start_step(z)
        else:
            code = F.relu(self.step_size * F.linear(z, self.dictionary.t()) - self.threshold)
            code = self.proximal_step(z, code)
        if not self.decodes:
            return code, code
        decoder = self.decoder if self.decoder is not None else self.dictionary
        return F.linear(code, decoder), code


class CrateMLP(nn.Module):
    """ToST's standard GELU MLP: ``W_2 GELU(W_1 x + b_1) + b_2`` (no ``b`` with ``mlp_bias=False``)."""

    def __init__(self, config: CrateConfig):
        super().__init__()
        inner = config.mlp_ratio * config.hidden_size
        self.fc_in = nn.Linear(config.hidden_size, inner, bias=config.mlp_bias)
        self.fc_out = _residual_output(nn.Linear(inner, config.hidden_size, bias=config.mlp_bias))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        activation = F.gelu(self.fc_in(x))
        return self.fc_out(activation), activation


class CrateLayerScale(nn.Module):
    """Learned per-channel scale of a residual branch (LayerScale), initialised small."""

    def __init__(self, config: CrateConfig):
        super().__init__()
        self.scale = nn.Parameter(torch.full((config.hidden_size,), config.layer_scale_init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class CrateLayer(GradientCheckpointingLayer):
    r"""One CRATE layer (one step of alternating sparse-rate-reduction optimisation).

    MSSA layers::  z_half = x + MSSA(LN(x));   x_next = ISTA(LN(z_half))   (+ z_half with ``ista_residual``)
    TSSA layers::  z_half = x + s1 * TSSA(LN(x));   x_next = z_half + s2 * MLP(LN(z_half))   (ToST, LayerScale s)
    """

    def __init__(self, config: CrateConfig, layer_idx: int):
        super().__init__()
        self.is_tssa = config.attention_type == "tssa"
        self.residual = config.ista_residual
        self.attention_norm = _layer_norm(config)
        self.sparse_norm = _layer_norm(config)
        self.dropout = nn.Dropout(config.residual_dropout)
        if self.is_tssa:
            self.attention = CrateTSSA(config, layer_idx)
            self.mlp = CrateMLP(config)
            self.attention_scale = CrateLayerScale(config)
            self.mlp_scale = CrateLayerScale(config)
        else:
            self.attention = CrateMSSA(config, layer_idx)
            self.ista = CrateISTA(config)

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        token_mask=None,
        position_ids=None,
        cache=None,
        output_attentions=False,
    ):
        attended, weights, projections = self.attention(
            self.attention_norm(hidden_states),
            attention_mask=attention_mask,
            token_mask=token_mask,
            position_ids=position_ids,
            cache=cache,
            output_attentions=output_attentions,
        )
        if self.is_tssa:
            z_half = hidden_states + self.dropout(self.attention_scale(attended))
            mlp_out, code = self.mlp(self.sparse_norm(z_half))
            return z_half + self.dropout(self.mlp_scale(mlp_out)), weights, projections, code
        z_half = hidden_states + self.dropout(attended)
        decoded, code = self.ista(self.sparse_norm(z_half))
        output = z_half + self.dropout(decoded) if self.residual else decoded
        return output, weights, projections, code


def _causal_bool_mask(query_length: int, key_length: int, device) -> torch.Tensor:
    """``True`` where query ``i`` (the last ``query_length`` positions of ``key_length``) may see key ``j``."""
    offset = key_length - query_length
    rows = torch.arange(query_length, device=device)[:, None] + offset
    return torch.arange(key_length, device=device)[None, :] <= rows


# ----------------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class CrateModelOutput(BaseModelOutputWithPast):
    """``BaseModelOutputWithPast`` plus, with ``output_sparse_codes=True``, per layer: ``sparse_codes`` (the ISTA
    code ``a``, width ``ratio * d``; for ToST the GELU activation) and ``subspace_projections`` (``w = x U``,
    ``(batch, heads, tokens, p)``), the inputs of the white-box measures."""

    sparse_codes: tuple[torch.Tensor, ...] | None = None
    subspace_projections: tuple[torch.Tensor, ...] | None = None


@dataclass
class CrateCausalLMOutput(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` plus the white-box tensors of [`CrateModelOutput`]."""

    sparse_codes: tuple[torch.Tensor, ...] | None = None
    subspace_projections: tuple[torch.Tensor, ...] | None = None


class CratePreTrainedModel(PreTrainedModel):
    config_class = CrateConfig
    config: CrateConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["CrateLayer"]
    _supports_sdpa = True
    _keys_to_ignore_on_load_unexpected = []
    # Every head of the family, by its Auto class: the modeling file save_pretrained copies holds them all.
    _auto_heads = {
        "AutoModel": "CrateModel",
        "AutoModelForCausalLM": "CrateForCausalLM",
        "AutoModelForSequenceClassification": "CrateForSequenceClassification",
    }

    def save_pretrained(self, save_directory, *args, **kwargs):
        """HF's ``save_pretrained``, with ``auto_map`` naming every head of the family (HF's names only the class
        saved), so that ``AutoModel`` and each ``AutoModelFor*`` of the family load the checkpoint in a plain
        transformers install with ``trust_remote_code=True``."""
        if self._auto_class is not None:  # the modeling code is copied beside the weights
            module = type(self).__module__.rsplit(".", 1)[-1]
            heads = {auto: f"{module}.{name}" for auto, name in self._auto_heads.items()}
            self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **heads}
        return super().save_pretrained(save_directory, *args, **kwargs)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # Our cache holds one tensor per MSSA layer (or a TSSA running state); the model builds it itself.
        return False

    def resize_token_embeddings(self, new_num_tokens=None, pad_to_multiple_of=None, mean_resizing=True):
        """HF's resize with ``new_num_tokens`` the tokenizer's new size: the table is padded to a multiple of
        ``pad_to_multiple_of`` (default ``config.vocab_pad_multiple``) and ``config.vocab_size`` stays the
        tokenizer's size (HF's own would set it to the padded row count)."""
        vocab_size = self.config.vocab_size if new_num_tokens is None else new_num_tokens
        multiple = pad_to_multiple_of or self.config.vocab_pad_multiple
        embeddings = super().resize_token_embeddings(vocab_size, multiple, mean_resizing)
        self.config.vocab_size, self.config.vocab_pad_multiple = vocab_size, multiple
        self.vocab_size = vocab_size
        return embeddings

    def _init_weights(self, module):
        """GPT-2 init (N(0, 0.02); the output projection of each residual branch N(0, 0.02 / sqrt(2L))); the
        dictionaries keep the official Kaiming-uniform init, ``U(-sqrt(6 / fan_in), sqrt(6 / fan_in))`` with the
        fan-in ``config.dictionary_fan_in``; ToST temperatures 1, position biases 0."""
        if isinstance(module, nn.Linear) and getattr(module, "_residual_branch_output", False):
            # Handled here, not on the parent module: HF may visit the Linear after its parent.
            std = self.config.initializer_range / math.sqrt(2 * self.config.num_hidden_layers)
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
            return
        super()._init_weights(module)
        if isinstance(module, CrateTSSA):
            init.ones_(module.temperature)
            if module.position_bias is not None:
                init.zeros_(module.position_bias)
        elif isinstance(module, CrateISTA):
            # Kaiming-uniform (a = 0, gain sqrt 2) at the configured fan-in; D and D1 are stored (d, s).
            bound = math.sqrt(6.0 / self.config.dictionary_fan_in)
            for dictionary in (module.dictionary, module.decoder):
                if dictionary is not None:
                    init.uniform_(dictionary, -bound, bound)
        elif isinstance(module, CrateLayerScale):
            init.constant_(module.scale, self.config.layer_scale_init)


class CrateModel(CratePreTrainedModel):
    """The CRATE decoder: token + position embeddings, ``num_hidden_layers`` [`CrateLayer`]s, and a final LayerNorm
    (``norm``; ``None`` with ``final_layer_norm=False``). The token table has ``config.padded_vocab_size`` rows."""

    def __init__(self, config: CrateConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.padded_vocab_size, config.hidden_size)
        self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.dropout = nn.Dropout(config.embedding_dropout)
        self.layers = nn.ModuleList([CrateLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = _layer_norm(config, config.final_layer_norm_eps) if config.final_layer_norm else None
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        output_sparse_codes: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> CrateModelOutput | tuple:
        cache = cache if cache is not None else past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch, tokens = inputs_embeds.shape[:2]
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if use_cache and cache is None:
            cache = CrateCache(self.config)
        if not use_cache:
            cache = None
        past = cache.get_seq_length() if cache is not None else 0

        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(
                f"attention_mask must be 2-D (batch, past + new tokens), got shape {tuple(attention_mask.shape)}"
            )
        if attention_mask is not None and attention_mask.shape[-1] != past + tokens:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[-1]} positions, but the cache holds {past} "
                f"and the input {tokens}: pass a mask over past and new tokens"
            )
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # no padding: take the fast causal path
        if position_ids is None and attention_mask is None:
            # positions past .. past + tokens - 1, checked on the host: no device sync (or graph break) in training
            position_ids = torch.arange(past, past + tokens, device=inputs_embeds.device)[None].expand(batch, -1)
            last_position = past + tokens - 1
        else:
            if position_ids is None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, -tokens:]
            # padded or given positions (generation, fine-tuning): their largest is read from the device
            last_position = int(position_ids.max()) if position_ids.numel() else -1
        if last_position >= self.config.max_position_embeddings:
            raise ValueError(
                f"sequence position {last_position} exceeds max_position_embeddings="
                f"{self.config.max_position_embeddings}: shorten the input or raise max_position_embeddings"
            )

        token_mask = None
        sdpa_mask = None
        if attention_mask is not None:
            token_mask = attention_mask[:, -tokens:].to(torch.float32)
            keys_visible = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, past + N)
            causal = _causal_bool_mask(tokens, attention_mask.shape[-1], inputs_embeds.device)
            # Each query also sees itself, so that fully padded rows stay finite.
            diagonal = torch.zeros_like(causal)
            diagonal[:, -tokens:] = torch.eye(tokens, dtype=torch.bool, device=causal.device)
            sdpa_mask = (causal & keys_visible) | diagonal

        hidden_states = self.dropout(inputs_embeds + self.embed_positions(position_ids))
        all_hidden, all_attentions, all_codes, all_projections = [], [], [], []
        for layer in self.layers:
            if output_hidden_states:
                all_hidden.append(hidden_states)
            hidden_states, weights, projections, code = layer(
                hidden_states, sdpa_mask, token_mask, position_ids, cache, bool(output_attentions)
            )
            if output_attentions:
                all_attentions.append(weights)
            if output_sparse_codes:
                all_codes.append(code)
                all_projections.append(projections)
        if self.norm is not None:
            hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden.append(hidden_states)

        output = CrateModelOutput(
            last_hidden_state=hidden_states,
            cache=cache,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_attentions) if output_attentions else None,
            sparse_codes=tuple(all_codes) if output_sparse_codes else None,
            subspace_projections=tuple(all_projections) if output_sparse_codes else None,
        )
        return output if _wants_dict(return_dict, self.config) else output.to_tuple()


def _wants_dict(return_dict: bool | None, config: CrateConfig) -> bool:
    return return_dict if return_dict is not None else getattr(config, "return_dict", True)


class CrateForCausalLM(CratePreTrainedModel, GenerationMixin):
    """CRATE language model: [`CrateModel`] and a linear LM head tied to the token embedding.

    With a padded table (``vocab_pad_multiple``) the head computes every row (the padded shape is the fast one)
    and the logits are the first ``vocab_size`` columns: the padded rows are never scored, so ``generate`` and
    pipelines cannot sample them and the loss's softmax runs over the tokenizer's ids only."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: CrateConfig):
        super().__init__(config)
        self.model = CrateModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        output_sparse_codes: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> CrateCausalLMOutput | tuple:
        r"""``labels`` are the input ids (shifted inside, ``-100`` ignored); ``logits_to_keep`` > 0 computes logits
        for the last positions only (generation)."""
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            output_sparse_codes=output_sparse_codes,
            return_dict=True,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden_states = hidden_states[:, -logits_to_keep:] if logits_to_keep else hidden_states
        else:
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states)
        if logits.shape[-1] != self.config.vocab_size:
            logits = logits[..., : self.config.vocab_size]  # a view: the padded rows' columns dropped
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **kwargs)
        output = CrateCausalLMOutput(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            sparse_codes=outputs.sparse_codes,
            subspace_projections=outputs.subspace_projections,
        )
        return output if _wants_dict(return_dict, self.config) else output.to_tuple()


class CrateForSequenceClassification(CratePreTrainedModel):
    """[`CrateModel`] with a linear head on the last non-padding token (as GPT-2's): the causal model has read the
    whole text only there. The last token is found from ``attention_mask`` when given (left or right padding),
    else from ``pad_token_id`` as GPT-2 does."""

    # The loss is the mean over this process's batch, not a sum over the global item count
    # (``num_items_in_batch``); without this, HF Trainer multiplies it by the number of processes.
    accepts_loss_kwargs = False

    def __init__(self, config: CrateConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = CrateModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SequenceClassifierOutputWithPast | tuple:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=False,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        logits = self.score(outputs.last_hidden_state)
        batch, tokens = logits.shape[:2]
        positions = torch.arange(tokens, device=logits.device)
        if attention_mask is not None:
            last = (positions * attention_mask.to(logits.device).long()).argmax(-1)
        elif input_ids is not None and self.config.pad_token_id is not None:
            last = (positions * (input_ids != self.config.pad_token_id).to(logits.device).long()).argmax(-1)
        else:
            if batch > 1 and input_ids is None:
                raise ValueError("pass attention_mask to classify a padded batch of inputs_embeds")
            last = torch.full((batch,), tokens - 1, device=logits.device)
        pooled = logits[torch.arange(batch, device=logits.device), last]

        loss = None
        if labels is not None:
            loss = self.loss_function(labels=labels, pooled_logits=pooled, config=self.config)
        output = SequenceClassifierOutputWithPast(
            loss=loss, logits=pooled, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )
        return output if _wants_dict(return_dict, self.config) else output.to_tuple()


__all__ = [
    "CrateCache",
    "CrateForCausalLM",
    "CrateForSequenceClassification",
    "CrateModel",
    "CratePreTrainedModel",
]
