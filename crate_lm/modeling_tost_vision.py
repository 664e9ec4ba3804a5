"""ToST vision models as HuggingFace ``PreTrainedModel``s: the official image classifier of the Token Statistics
Transformer (RobinWu218/ToST ``tost_vision/tost.py``, an XCiT skeleton with TSSA layers).

Forward pass, for an image ``X`` (``P = patch_size = 2^k``)::

    x      = Stem(X)                        k x [3x3 stride-2 conv, BatchNorm], GELU between: (N = H/P * W/P, d)
    x      = x + Fourier(H/P, W/P)          sines/cosines of the normalised row and column, a 1x1 conv to d
    x      = x + s1 TSSA(LN(x))             num_hidden_layers TSSA layers over the patch tokens (no CLS token):
    x      = x + s2 MLP(LN(x))              a gradient step on the variational compression term, then a GELU MLP
    x      = [cls; x]                       the CLS token joins only now
    y      = LN1(x);  x = x + g1 [CA(y); y_patches]        num_class_attention_layers class-attention layers
    x      = LN2(x);  x = x + [g2 MLP(x_cls); x_patches]   (CaiT; the patch tokens pass through, as in the official)
    logits = Linear(LN(x)_cls)

``TSSA`` is the layer of the ToST LM (``modeling_crate.CrateTSSA``) with its statistics taken over all ``N`` patch
tokens and a bias on the subspace projection ``U`` (official ``qkv``); ``CA`` is softmax attention whose only query
is the CLS token. TSSA is linear in ``N``: no ``N x N`` matrix is formed.

This file is copied into every saved checkpoint for ``trust_remote_code`` loading, with ``modeling_crate.py`` and
its configuration files; it imports only torch, transformers and those files.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from .configuration_tost_vision import ToSTVisionConfig
from .modeling_crate import CrateLayer, CrateLayerScale, CrateMLP, CratePreTrainedModel, CrateTSSA, _wants_dict
from .modeling_crate_vision import CrateVisionModelOutput, ImageClassifierForward


class ToSTConvStem(nn.Module):
    """``log2(P)`` 3x3 stride-2 convolutions (no bias) each followed by BatchNorm, GELU between them; widths
    ``d / 2^(k-1), ..., d / 2, d``. Returns the tokens ``(batch, N, d)`` in row-major order and the grid."""

    def __init__(self, config: ToSTVisionConfig):
        super().__init__()
        self.num_channels = config.num_channels
        depth = config.stem_depth
        widths = [config.num_channels] + [config.hidden_size >> (depth - 1 - i) for i in range(depth)]
        stages: list[nn.Module] = []
        for i in range(depth):
            if i:
                stages.append(nn.GELU())
            stages.append(nn.Conv2d(widths[i], widths[i + 1], kernel_size=3, stride=2, padding=1, bias=False))
            stages.append(nn.BatchNorm2d(widths[i + 1]))
        self.layers = nn.Sequential(*stages)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        if pixel_values.dim() != 4 or pixel_values.shape[1] != self.num_channels:
            raise ValueError(
                f"pixel_values must be (batch, {self.num_channels}, height, width), got shape "
                f"{tuple(pixel_values.shape)}"
            )
        features = self.layers(pixel_values)
        return features.flatten(2).transpose(1, 2), (features.shape[2], features.shape[3])


class ToSTFourierPositions(nn.Module):
    r"""Fourier position encoding of a ``(h, w)`` grid (DETR / XCiT). With the row ``r`` and column ``c`` of a
    token normalised to ``(0, 2 pi]`` and ``F = position_encoding_dim`` frequencies per axis,
    ``omega_i = T^(2 floor(i / 2) / F)``::

        e(r)_i = sin(r / omega_i) for even i, cos(r / omega_i) for odd i;     PE = Conv1x1([e(r); e(c)])   (2F -> d)
    """

    def __init__(self, config: ToSTVisionConfig):
        super().__init__()
        self.frequencies = config.position_encoding_dim
        self.temperature = config.position_encoding_temperature
        self.projection = nn.Conv2d(2 * self.frequencies, config.hidden_size, kernel_size=1)

    def forward(self, grid: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        """The encoding ``(1, h * w, d)`` of the grid, tokens in row-major order."""
        device = self.projection.weight.device
        eps = 1e-6
        rows = torch.arange(1, grid[0] + 1, dtype=torch.float32, device=device)
        cols = torch.arange(1, grid[1] + 1, dtype=torch.float32, device=device)
        rows = rows / (grid[0] + eps) * 2 * math.pi
        cols = cols / (grid[1] + eps) * 2 * math.pi
        index = torch.arange(self.frequencies, dtype=torch.float32, device=device)
        omega = self.temperature ** (2 * torch.div(index, 2, rounding_mode="floor") / self.frequencies)
        even = (index % 2 == 0)[None, :]

        def encode(positions: torch.Tensor) -> torch.Tensor:
            angles = positions[:, None] / omega
            return torch.where(even, angles.sin(), angles.cos())  # (length, F)

        by_row = encode(rows)[:, None, :].expand(grid[0], grid[1], -1)
        by_col = encode(cols)[None, :, :].expand(grid[0], grid[1], -1)
        features = torch.cat([by_row, by_col], dim=-1).permute(2, 0, 1)[None]  # (1, 2F, h, w)
        return self.projection(features.to(dtype)).flatten(2).transpose(1, 2)


class ToSTClassAttention(nn.Module):
    r"""Class attention (CaiT): only the CLS token queries. With ``q, k, v = x W_qkv`` split into heads of width
    ``p``::

        CA(x) = W_out [ softmax(q_cls k^T / sqrt(p)) v ]_{heads} + b_out       (batch, 1, d)
    """

    def __init__(self, config: ToSTVisionConfig):
        super().__init__()
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = config.attention_dropout

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, tokens, width = x.shape
        q, k, v = self.qkv_proj(x).view(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        scores = torch.matmul(q[:, :, :1], k.transpose(-1, -2)) / math.sqrt(self.head_dim)  # (B, K, 1, N + 1)
        weights = F.dropout(scores.softmax(dim=-1), self.dropout, self.training)
        cls = torch.matmul(weights, v).transpose(1, 2).reshape(batch, 1, width)
        return self.out_proj(cls), weights[:, :, 0]


class ToSTClassAttentionLayer(nn.Module):
    """One class-attention layer: the CLS token reads the patch tokens and goes through a GELU MLP. As in the
    official code, the residual of the attention branch adds ``LN1(x)`` to each patch token and the MLP branch
    doubles them (``x + x``); only the CLS token reaches the head, but the next layer's keys see those values."""

    def __init__(self, config: ToSTVisionConfig):
        super().__init__()
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = ToSTClassAttention(config)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CrateMLP(config)
        self.attention_scale = CrateLayerScale(config)
        self.mlp_scale = CrateLayerScale(config)
        self.tokens_norm = config.class_attention_tokens_norm
        self.dropout = nn.Dropout(config.residual_dropout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        normed = self.attention_norm(x)
        cls, weights = self.attention(normed)
        x = x + self.attention_scale(torch.cat([self.dropout(cls), normed[:, 1:]], dim=1))
        if self.tokens_norm:
            x = self.mlp_norm(x)
        else:
            x = torch.cat([self.mlp_norm(x[:, :1]), x[:, 1:]], dim=1)
        cls_mlp, _ = self.mlp(x[:, :1])
        return x + self.dropout(torch.cat([self.mlp_scale(cls_mlp), x[:, 1:]], dim=1)), weights


class ToSTVisionPreTrainedModel(CratePreTrainedModel):
    config_class = ToSTVisionConfig
    config: ToSTVisionConfig
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["CrateLayer", "ToSTClassAttentionLayer"]
    _auto_heads = {"AutoModel": "ToSTVisionModel", "AutoModelForImageClassification": "ToSTForImageClassification"}

    def _init_weights(self, module):
        """The official init: every Linear truncated N(0, 0.02) with zero bias, LayerNorms (1, 0), the CLS token
        truncated N(0, 0.02), TSSA temperatures 1, LayerScales ``layer_scale_init``; the convolutions and
        BatchNorms keep torch's defaults (Kaiming-uniform ``a = sqrt(5)``: bound ``1 / sqrt(fan_in)``)."""
        if isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=self.config.initializer_range)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1] // module.groups
            bound = 1.0 / math.sqrt(fan_in)
            init.uniform_(module.weight, -bound, bound)
            if module.bias is not None:
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            if isinstance(module, nn.BatchNorm2d):
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
                init.zeros_(module.num_batches_tracked)
        elif isinstance(module, CrateTSSA):
            init.ones_(module.temperature)
        elif isinstance(module, CrateLayerScale):
            init.constant_(module.scale, self.config.layer_scale_init)
        elif isinstance(module, ToSTVisionModel):
            init.trunc_normal_(module.cls_token, std=self.config.initializer_range)


class ToSTVisionModel(ToSTVisionPreTrainedModel):
    """The ToST image encoder: stem, Fourier positions, TSSA layers, class-attention layers and the head's
    LayerNorm. ``pooler_output`` is the normalised CLS token."""

    def __init__(self, config: ToSTVisionConfig):
        super().__init__(config)
        self.stem = ToSTConvStem(config)
        self.positions = ToSTFourierPositions(config) if config.position_encoding_dim else None
        self.dropout = nn.Dropout(config.embedding_dropout)
        self.layers = nn.ModuleList([CrateLayer(config, i) for i in range(config.num_hidden_layers)])
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.class_attention_layers = nn.ModuleList(
            [ToSTClassAttentionLayer(config) for _ in range(config.num_class_attention_layers)]
        )
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.stem

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        output_sparse_codes: bool | None = None,
        interpolate_pos_encoding: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CrateVisionModelOutput | tuple:
        r"""``hidden_states``: the patch tokens before each TSSA layer and after the last, then the CLS + patch
        tokens after each class-attention layer. ``attentions``: per TSSA layer the membership ``Pi``
        ``(batch, heads, N)``, then per class-attention layer the CLS token's weights ``(batch, heads, 1 + N)``.
        ``sparse_codes`` / ``subspace_projections``: per TSSA layer the MLP's GELU activation and ``w = LN(x) U``,
        the inputs of the white-box measures. ``interpolate_pos_encoding`` is accepted for HF ViT compatibility:
        the Fourier positions fit any grid."""
        if pixel_values is None:
            raise ValueError("pixel_values is required")
        dtype = self.cls_token.dtype
        hidden_states, grid = self.stem(pixel_values.to(dtype))
        if self.positions is not None:
            hidden_states = hidden_states + self.positions(grid, dtype)
        hidden_states = self.dropout(hidden_states)
        all_hidden, all_attentions, all_codes, all_projections = [], [], [], []
        for layer in self.layers:
            if output_hidden_states:
                all_hidden.append(hidden_states)
            hidden_states, weights, projections, code = layer(hidden_states)
            all_attentions.append(weights)
            all_codes.append(code)
            all_projections.append(projections)
        if output_hidden_states:
            all_hidden.append(hidden_states)
        hidden_states = torch.cat([self.cls_token.expand(hidden_states.shape[0], -1, -1), hidden_states], dim=1)
        for layer in self.class_attention_layers:
            hidden_states, weights = layer(hidden_states)
            all_attentions.append(weights)
            if output_hidden_states:
                all_hidden.append(hidden_states)
        last_hidden_state = self.norm(hidden_states)
        output = CrateVisionModelOutput(
            last_hidden_state=last_hidden_state,
            pooler_output=last_hidden_state[:, 0],
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_attentions) if output_attentions else None,
            sparse_codes=tuple(all_codes) if output_sparse_codes else None,
            subspace_projections=tuple(all_projections) if output_sparse_codes else None,
        )
        return output if _wants_dict(return_dict, self.config) else output.to_tuple()


class ToSTForImageClassification(ImageClassifierForward, ToSTVisionPreTrainedModel):
    """[`ToSTVisionModel`] and a linear classifier on the normalised CLS token."""

    # The loss is the mean over this process's batch (see CrateForImageClassification).
    accepts_loss_kwargs = False

    def __init__(self, config: ToSTVisionConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = ToSTVisionModel(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.stem


__all__ = ["ToSTForImageClassification", "ToSTVisionModel", "ToSTVisionPreTrainedModel"]
