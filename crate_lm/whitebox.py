r"""White-box measurements of CRATE-family language models (and of GPT-2 as a baseline).

A CRATE layer is one step of optimising the sparse rate reduction ``max E[ R(Z) - R^c(Z | U_[K]) - lambda ||Z||_0 ]``;
these functions measure, layer by layer, how far each term has moved. Tokens are rows. With ``eps^2 = 0.01``:

* Coding rate of ``Z`` (N tokens of width d)::

      R_eps(Z) = 1/2 logdet(I_d + d / (N eps^2) Z^T Z) = 1/2 logdet(I_N + d / (N eps^2) Z Z^T)

  computed in float64 on the smaller side (the N x N Gram matrix when N < d, else d x d) by a Cholesky factor.

* Compression term (the MSSA objective). Take the layer's subspace projections ``w = LN(x) U`` (B, K, N, p),
  normalise each token's per-head vector to unit length (``w_hat``) and sum the per-head rates::

      R^c = sum_k R^c_k,      R^c_k = 1/2 logdet(I_p + p / (N eps^2) W_hat_k^T W_hat_k)

* Full rate on the same normalised tokens: concatenate the K unit vectors of a token (width d = K p, norm sqrt(K))::

      R = 1/2 logdet(I_d + d / (N eps^2) W_hat^T W_hat),      Delta R = R - R^c

  With K = 1, R = R^c. In general Delta R has no fixed sign: Fischer's inequality gives
  ``logdet(I + c W^T W) <= sum_k logdet(I + c W_k^T W_k)`` at a *common* scale c, but R uses d/(N eps^2) and
  R^c uses p/(N eps^2).

* Sparsity of the sparse code ``a`` (B, N, s) (the ISTA output; for the 4x variants the code of width 4d, not the
  decoded output): ``l0 = #{a != 0} / (N s)`` (exact zeros of the ReLU), and the scale-free Hoyer measure, per token
  ``(sqrt(s) - ||a||_1 / ||a||_2) / (sqrt(s) - 1)`` (0 for a constant vector, 1 for a one-hot one; an all-zero token
  counts as 1), averaged over the tokens. For ToST and GPT-2 the code is the GELU MLP activation, which is almost
  never exactly zero: its l0 is close to 1 and only the Hoyer value is informative.

* ToST membership entropy: ``H = - sum_k Pi_k log Pi_k`` per token (Pi is a softmax over the K heads, so
  ``0 <= H <= log K``), averaged over the tokens.

Every measure is computed per sample over its valid (non-padding) tokens, N being that sample's number of valid
tokens, and then averaged over the batch (``rc_std`` is the population standard deviation over the batch).

GPT-2 has no shared q = k = v projection; as the analogue of MSSA's ``w`` we take the **query** ``q = LN(x) W_q + b_q``
(the first ``hidden_size`` columns of ``attn.c_attn``), split into heads; its MLP activation is the output of
``mlp.act``. Both are captured by forward hooks, removed even when the forward pass fails.

Vision models (``crate_vision``, HF ``vit``) are measured the same way over an image's tokens (CLS and patches):
N is 1 + the number of patches; ViT's query is the output of ``attention.q_proj`` and its code the output of
``mlp.activation_fn``. [`cls_attention_maps`] gives the CLS token's attention over the patch grid, the maps in
which supervised CRATE's heads segment objects.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "coding_rate",
    "compression_rate",
    "full_rate",
    "rate_reduction",
    "sparsity_l0",
    "hoyer_sparsity",
    "membership_entropy",
    "measure_crate",
    "measure_gpt2",
    "measure_llama",
    "measure",
    "measure_vision",
    "cls_attention_maps",
]

DEFAULT_EPS_SQ = 0.01


# ----------------------------------------------------------------------------------------------------------------------
# Rates
# ----------------------------------------------------------------------------------------------------------------------


def _spd_logdet(matrix: torch.Tensor) -> torch.Tensor:
    """logdet of a batch of symmetric positive-definite matrices (Cholesky; slogdet where Cholesky fails)."""
    factor, info = torch.linalg.cholesky_ex(matrix)
    logdet = 2.0 * factor.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    if bool((info != 0).any()):
        logdet = torch.where(info == 0, logdet, torch.linalg.slogdet(matrix).logabsdet)
    return logdet


def coding_rate(tokens: torch.Tensor, eps_sq: float = DEFAULT_EPS_SQ, num_tokens=None) -> torch.Tensor:
    r"""``R_eps(Z) = 1/2 logdet(I + d / (N eps^2) Z^T Z)`` for ``Z`` of shape ``(..., N, d)``; returns ``(...,)``.

    Computed in float64 on the smaller side of ``Z``. ``num_tokens`` (a number or a ``(...,)`` tensor) replaces N
    in the scale: pass the count of valid tokens when padding rows of ``Z`` are zero (zero rows add nothing to
    ``Z^T Z``, nor to the logdet of the Gram side).
    """
    z = tokens.to(torch.float64)
    n, d = z.shape[-2], z.shape[-1]
    if num_tokens is None:
        num_tokens = n
    count = torch.as_tensor(num_tokens, dtype=torch.float64, device=z.device).clamp_min(1.0)
    scale = (d / (count * eps_sq))[..., None, None]
    gram = z @ z.transpose(-1, -2) if n < d else z.transpose(-1, -2) @ z  # (.., min(N, d), min(N, d))
    eye = torch.eye(gram.shape[-1], dtype=torch.float64, device=z.device)
    return 0.5 * _spd_logdet(eye + scale * gram)


def _normalised_heads(projections: torch.Tensor, token_mask: torch.Tensor | None):
    """Unit-normalise each token's per-head vector (float64), zero the padding tokens; also the valid counts (B,)."""
    if projections.dim() != 4:
        raise ValueError(f"projections must be (batch, heads, tokens, p), got shape {tuple(projections.shape)}")
    w_hat = F.normalize(projections.to(torch.float64), dim=-1)
    batch, _, tokens, _ = projections.shape
    if token_mask is None:
        counts = torch.full((batch,), float(tokens), dtype=torch.float64, device=w_hat.device)
        return w_hat, counts
    mask = _check_mask(token_mask, batch, tokens).to(device=w_hat.device, dtype=torch.float64)
    return w_hat * mask[:, None, :, None], mask.sum(-1)


def _check_mask(token_mask: torch.Tensor, batch: int, tokens: int) -> torch.Tensor:
    if tuple(token_mask.shape) != (batch, tokens):
        raise ValueError(f"token_mask must have shape {(batch, tokens)}, got {tuple(token_mask.shape)}")
    return token_mask.bool()


def _rates(projections, eps_sq, token_mask):
    """(per-head R^c (B, K), full rate R (B,)) on the same normalised tokens."""
    w_hat, counts = _normalised_heads(projections, token_mask)
    per_head = coding_rate(w_hat, eps_sq, counts[:, None])  # width p: scale p / (N eps^2)
    batch, heads, tokens, p = w_hat.shape
    concatenated = w_hat.transpose(1, 2).reshape(batch, tokens, heads * p)  # width d = K p
    return per_head, coding_rate(concatenated, eps_sq, counts)


def compression_rate(
    projections: torch.Tensor, eps_sq: float = DEFAULT_EPS_SQ, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    r"""Per-sample, per-head ``R^c_k = 1/2 logdet(I + p / (N eps^2) W_hat_k^T W_hat_k)``, shape ``(B, K)``.

    ``projections``: ``(B, K, N, p)``; each token's head vector is normalised to unit length. ``token_mask``
    ``(B, N)`` (1 = real token) excludes padding, N being the sample's count of real tokens. Sum over the heads
    for ``R^c``.
    """
    w_hat, counts = _normalised_heads(projections, token_mask)
    return coding_rate(w_hat, eps_sq, counts[:, None])


def full_rate(
    projections: torch.Tensor, eps_sq: float = DEFAULT_EPS_SQ, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    r"""Per-sample ``R`` of the concatenated unit-normalised head vectors (width ``d = K p``), shape ``(B,)``."""
    return _rates(projections, eps_sq, token_mask)[1]


def rate_reduction(
    projections: torch.Tensor, eps_sq: float = DEFAULT_EPS_SQ, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    r"""Per-sample ``Delta R = R - sum_k R^c_k`` on the same normalised tokens, shape ``(B,)``."""
    per_head, rate = _rates(projections, eps_sq, token_mask)
    return rate - per_head.sum(-1)


# ----------------------------------------------------------------------------------------------------------------------
# Sparsity and membership
# ----------------------------------------------------------------------------------------------------------------------


def _token_weights(shape, token_mask, device):
    """Float64 weights of the tokens (..., N) (1 for valid ones) and their count (...)."""
    if token_mask is None:
        weights = torch.ones(shape, dtype=torch.float64, device=device)
    else:
        if tuple(token_mask.shape) != tuple(shape):
            raise ValueError(f"token_mask must have shape {tuple(shape)}, got {tuple(token_mask.shape)}")
        weights = token_mask.to(device=device, dtype=torch.float64)
    return weights, weights.sum(-1).clamp_min(1.0)


def sparsity_l0(codes: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Fraction of non-zero entries of ``codes`` ``(..., N, s)`` over its valid tokens; returns ``(...)``."""
    weights, count = _token_weights(codes.shape[:-1], token_mask, codes.device)
    nonzero = (codes != 0).to(torch.float64).mean(-1)  # per token
    return (nonzero * weights).sum(-1) / count


def hoyer_sparsity(codes: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Hoyer sparsity ``(sqrt(s) - |a|_1 / |a|_2) / (sqrt(s) - 1)`` per token of ``codes`` ``(..., N, s)``, averaged
    over the valid tokens; returns ``(...)``. 0 for a constant vector, 1 for a one-hot one; all-zero tokens count
    as 1 (and every token counts as 1 when s = 1)."""
    weights, count = _token_weights(codes.shape[:-1], token_mask, codes.device)
    a = codes.to(torch.float64)
    width = a.shape[-1]
    l1, l2 = a.abs().sum(-1), a.norm(dim=-1)
    if width == 1:
        per_token = torch.ones_like(l1)
    else:
        root = width**0.5
        ratio = torch.where(l2 > 0, l1 / l2.clamp_min(torch.finfo(torch.float64).tiny), torch.ones_like(l1))
        per_token = ((root - ratio) / (root - 1)).clamp(0.0, 1.0)  # clamp rounding only: 1 <= l1/l2 <= sqrt(s)
    return (per_token * weights).sum(-1) / count


def membership_entropy(pi: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over valid tokens of the entropy (nats) of ToST's membership ``Pi`` ``(B, K, N)`` over the K heads;
    returns ``(B,)``, each in ``[0, log K]``."""
    p = pi.to(torch.float64)
    entropy = -torch.special.xlogy(p, p).sum(-2)  # (B, N); 0 log 0 = 0
    weights, count = _token_weights(entropy.shape, token_mask, pi.device)
    return (entropy * weights).sum(-1) / count


# ----------------------------------------------------------------------------------------------------------------------
# Whole models
# ----------------------------------------------------------------------------------------------------------------------


def _layer_record(layer: int, projections, codes, token_mask, eps_sq, membership=None) -> dict:
    """The per-layer dict: per-sample values, averaged over the batch."""
    per_head, rate = _rates(projections, eps_sq, token_mask)
    rc = per_head.sum(-1)
    record = {
        "layer": layer,
        "rc": rc.mean().item(),
        "rc_std": rc.std(correction=0).item(),
        "rc_per_head": per_head.mean(0).tolist(),
        "rate": rate.mean().item(),
        "delta_r": (rate - rc).mean().item(),
        "sparsity_l0": sparsity_l0(codes, token_mask).mean().item(),
        "hoyer": hoyer_sparsity(codes, token_mask).mean().item(),
    }
    if membership is not None:
        record["pi_entropy"] = membership_entropy(membership, token_mask).mean().item()
    return record


def _prepare(model: nn.Module, input_ids, attention_mask):
    """Inputs on the model's device and the validated token mask (None when there is no padding)."""
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        return input_ids, None, None
    attention_mask = attention_mask.to(device)
    token_mask = _check_mask(attention_mask, *input_ids.shape)
    if not bool(token_mask.any(-1).all()):
        raise ValueError("every sample needs at least one non-padding token (attention_mask row of zeros)")
    return input_ids, attention_mask, token_mask


class _EvalMode:
    """``model.eval()`` and ``torch.no_grad()`` inside, the previous training mode restored on exit."""

    def __init__(self, model: nn.Module):
        self.model, self.was_training = model, model.training
        self.no_grad = torch.no_grad()

    def __enter__(self):
        self.no_grad.__enter__()
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)
        self.no_grad.__exit__(*exc)
        return False


def measure_crate(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    eps_sq: float = DEFAULT_EPS_SQ,
) -> list[dict]:
    """One dict per layer of a CRATE model (``CrateForCausalLM``, ``CrateModel`` or any ``CratePreTrainedModel``).

    Keys: ``layer``, ``rc`` (batch mean of ``sum_k R^c_k`` on the layer's ``w = LN(x) U``), ``rc_std``,
    ``rc_per_head`` (list of K batch means), ``rate`` (R), ``delta_r`` (R - R^c), ``sparsity_l0`` and ``hoyer``
    (of the sparse code: ISTA code of width ``dictionary_size``, ToST's GELU activation), and for ToST
    ``pi_entropy``. ``attention_mask`` (B, N) marks real tokens; padding is excluded from every measure.
    """
    base = model.base_model  # CrateModel: no LM head needed
    input_ids, attention_mask, token_mask = _prepare(model, input_ids, attention_mask)
    is_tssa = model.config.attention_type == "tssa"
    with _EvalMode(model):
        outputs = base(
            input_ids=input_ids,
            attention_mask=attention_mask,
            use_cache=False,
            output_sparse_codes=True,
            output_attentions=is_tssa,
            return_dict=True,
        )
        return [
            _layer_record(index, projections, codes, token_mask, eps_sq, outputs.attentions[index] if is_tssa else None)
            for index, (projections, codes) in enumerate(zip(outputs.subspace_projections, outputs.sparse_codes))
        ]


def measure_gpt2(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    eps_sq: float = DEFAULT_EPS_SQ,
) -> list[dict]:
    """The measures of [`measure_crate`] for a HF GPT-2 (``GPT2LMHeadModel`` or ``GPT2Model``), through hooks.

    The query ``q`` of each layer (first ``hidden_size`` columns of ``attn.c_attn``, split into heads) stands in
    for MSSA's ``w`` (GPT-2's q has a bias, MSSA's w has none); the code is the output of ``mlp.act`` (GELU).
    With ``attention_mask``, position ids are counted over the real tokens, so left and right padding both give
    each sample's values alone.
    """
    base = model.base_model  # GPT2Model
    heads, width = model.config.n_head, model.config.n_embd
    input_ids, attention_mask, token_mask = _prepare(model, input_ids, attention_mask)
    queries: dict[int, torch.Tensor] = {}
    activations: dict[int, torch.Tensor] = {}

    def keep_query(index):
        def hook(module, args, output):
            batch, tokens = output.shape[:2]
            queries[index] = output[..., :width].reshape(batch, tokens, heads, width // heads).transpose(1, 2)

        return hook

    def keep_activation(index):
        def hook(module, args, output):
            activations[index] = output

        return hook

    handles = []
    try:
        for index, block in enumerate(base.h):
            handles.append(block.attn.c_attn.register_forward_hook(keep_query(index)))
            handles.append(block.mlp.act.register_forward_hook(keep_activation(index)))
        with _EvalMode(model):
            # Positions count real tokens only (as CRATE does and as HF generation does for GPT-2), so that a
            # left-padded sample is measured as if it were alone.
            position_ids = None if attention_mask is None else (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
            base(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=False,
                return_dict=True,
            )
            return [
                _layer_record(index, queries[index], activations[index], token_mask, eps_sq)
                for index in range(len(base.h))
            ]
    finally:
        for handle in handles:
            handle.remove()


def measure_llama(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    eps_sq: float = DEFAULT_EPS_SQ,
) -> list[dict]:
    """The measures of [`measure_crate`] for a HF Llama (``LlamaForCausalLM`` or ``LlamaModel``), through hooks.

    The query ``q`` of each layer (``self_attn.q_proj``, before the rotary embedding, split into heads) stands in
    for MSSA's ``w``; the code is the SwiGLU hidden ``SiLU(x W_gate) * (x W_up)`` that ``mlp.down_proj`` reads (the
    MLP's neurons). Positions count real tokens, as for GPT-2.
    """
    base = model.base_model  # LlamaModel
    heads = model.config.num_attention_heads
    input_ids, attention_mask, token_mask = _prepare(model, input_ids, attention_mask)
    queries, handles = _captured([layer.self_attn.q_proj for layer in base.layers])
    codes: dict[int, torch.Tensor] = {}

    def keep_code(index):
        def hook(module, args):
            codes[index] = args[0]

        return hook

    handles += [layer.mlp.down_proj.register_forward_pre_hook(keep_code(i)) for i, layer in enumerate(base.layers)]
    try:
        with _EvalMode(model):
            position_ids = None if attention_mask is None else (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
            base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
            records = []
            for index in range(len(base.layers)):
                batch, tokens, width = queries[index].shape
                w = queries[index].reshape(batch, tokens, heads, width // heads).transpose(1, 2)
                records.append(_layer_record(index, w, codes[index], token_mask, eps_sq))
            return records
    finally:
        for handle in handles:
            handle.remove()


def _captured(modules: list[nn.Module]):
    """Forward hooks keeping each module's output by index; the handles are removed by the caller."""
    kept: dict[int, torch.Tensor] = {}

    def keep(index):
        def hook(module, args, output):
            kept[index] = output

        return hook

    return kept, [module.register_forward_hook(keep(i)) for i, module in enumerate(modules)]


def measure_vision(model: nn.Module, pixel_values: torch.Tensor, eps_sq: float = DEFAULT_EPS_SQ) -> list[dict]:
    """The measures of [`measure_crate`] for an image model over each image's tokens (CLS + patches):
    ``crate_vision`` and ``tost_vision`` from their outputs (ToST vision: its TSSA layers, over the patch tokens),
    HF ViT through hooks (query ``attention.q_proj``, code ``mlp.activation_fn``)."""
    base = model.base_model
    pixel_values = pixel_values.to(next(model.parameters()).device)
    if model.config.model_type in ("crate_vision", "tost_vision"):  # ToST vision: its TSSA layers
        is_tssa = model.config.attention_type == "tssa"
        with _EvalMode(model):
            outputs = base(pixel_values, output_sparse_codes=True, output_attentions=is_tssa, return_dict=True)
            return [
                _layer_record(i, w, code, None, eps_sq, outputs.attentions[i] if is_tssa else None)
                for i, (w, code) in enumerate(zip(outputs.subspace_projections, outputs.sparse_codes))
            ]
    heads = model.config.num_attention_heads
    queries, query_handles = _captured([layer.attention.q_proj for layer in base.layers])
    codes, code_handles = _captured([layer.mlp.activation_fn for layer in base.layers])
    try:
        with _EvalMode(model):
            base(pixel_values, interpolate_pos_encoding=True, return_dict=True)  # any input size, as CRATE
            records = []
            for index in range(len(base.layers)):
                batch, tokens, width = queries[index].shape
                w = queries[index].reshape(batch, tokens, heads, width // heads).transpose(1, 2)
                records.append(_layer_record(index, w, codes[index], None, eps_sq))
            return records
    finally:
        for handle in query_handles + code_handles:
            handle.remove()


@torch.no_grad()
def cls_attention_maps(model: nn.Module, pixel_values: torch.Tensor, layer: int = -1) -> torch.Tensor:
    """The CLS token's attention over the patches in one layer (default: the last), per head, as images:
    ``(batch, heads, grid_h, grid_w)``. CRATE (MSSA) from ``output_attentions``, each map summing to at most 1 (the
    CLS token's weight on itself is left out); HF ViT likewise, run with eager attention for the call. ToST forms no
    attention matrix: its map is each patch's membership ``Pi`` in the head (summing to 1 over the heads)."""
    pixel_values = pixel_values.to(next(model.parameters()).device)
    config = model.config
    grid = (pixel_values.shape[-2] // config.patch_size, pixel_values.shape[-1] // config.patch_size)
    previous = getattr(config, "_attn_implementation", None)
    if config.model_type == "vit" and previous != "eager":
        model.set_attn_implementation("eager")
    try:
        with _EvalMode(model):
            attentions = model.base_model(
                pixel_values, output_attentions=True, interpolate_pos_encoding=True, return_dict=True
            ).attentions
    finally:
        if config.model_type == "vit" and previous != "eager":
            model.set_attn_implementation(previous)
    weights = attentions[layer].float()
    cls_row = weights[:, :, 1:] if weights.dim() == 3 else weights[:, :, 0, 1:]  # ToST: Pi (B, K, N)
    return cls_row.reshape(*cls_row.shape[:2], *grid)


def measure(
    model: nn.Module, inputs: torch.Tensor, attention_mask: torch.Tensor | None = None, eps_sq: float = DEFAULT_EPS_SQ
) -> list[dict]:
    """Per-layer white-box measures of a CRATE (``crate``), GPT-2 (``gpt2``) or Llama (``llama``) language model on
    ``input_ids``, or of a CRATE (``crate_vision``), ToST (``tost_vision``) or ViT (``vit``) image model on
    ``pixel_values``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type == "crate":
        return measure_crate(model, inputs, attention_mask, eps_sq)
    if model_type == "gpt2":
        return measure_gpt2(model, inputs, attention_mask, eps_sq)
    if model_type == "llama":
        return measure_llama(model, inputs, attention_mask, eps_sq)
    if model_type in ("crate_vision", "tost_vision", "vit"):
        return measure_vision(model, inputs, eps_sq)
    raise ValueError(
        f"white-box measures support model types 'crate', 'gpt2', 'llama', 'crate_vision', 'tost_vision' and "
        f"'vit', got {model_type!r}"
    )
