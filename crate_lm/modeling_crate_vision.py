"""CRATE vision models as HuggingFace ``PreTrainedModel``s.

Skeleton (the official CRATE): an image is cut into ``P x P`` patches; each flattened patch goes through
``LN -> Linear -> LN`` (or a stride-``P`` convolution, ``patch_embedding_type="conv"``); a learned CLS token is
prepended and learned absolute positions added; then ``num_hidden_layers`` CRATE layers, **not causal**::

    z_half = x + MSSA(LN(x))          compression: a gradient step on R^c(Z | U_[K])
    x_next = ISTA(LN(z_half))         sparsification: one proximal step on the non-negative LASSO against D
                                      (CRATE-alpha: x_next = z_half + D1 ISTA_2(LN(z_half)), 4x dictionary)

(ToST layers: ``z_half = x + s1 TSSA(LN(x))``, ``x_next = z_half + s2 MLP(LN(z_half))``); the layers are the LM's
(``modeling_crate.CrateLayer``), built with ``causal_attention = False``. The head is ``LN -> Linear`` on the CLS
token (or on the mean of all tokens, ``pooling="mean"``).

Position embeddings are interpolated (bicubic, as HF ViT) when an input's patch grid differs from the training
grid; [`CrateVisionModel.resize_position_embeddings`] makes a new resolution permanent (fine-tuning).

This file is copied into every saved checkpoint for ``trust_remote_code`` loading, with ``modeling_crate.py`` and
the two configuration files; it imports only torch, transformers and those files.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput

from .configuration_crate_vision import CrateVisionConfig
from .modeling_crate import CrateLayer, CratePreTrainedModel, _wants_dict


def interpolate_position_table(table: torch.Tensor, grid: tuple[int, int], prefix_tokens: int = 1) -> torch.Tensor:
    """Resize a ViT-style position table ``(1, prefix + H*W, d)`` (square training grid) to ``grid = (h, w)``
    patches, bicubically; the ``prefix_tokens`` (CLS) rows are kept. Works for CRATE and HF ViT tables alike."""
    prefix, patches = table[:, :prefix_tokens], table[:, prefix_tokens:]
    side = int(round(patches.shape[1] ** 0.5))
    if side * side != patches.shape[1]:
        raise ValueError(f"position table of {patches.shape[1]} patches is not a square grid")
    if (side, side) == tuple(grid):
        return table
    width = patches.shape[-1]
    square = patches.reshape(1, side, side, width).permute(0, 3, 1, 2).float()
    resized = F.interpolate(square, size=tuple(grid), mode="bicubic", align_corners=False)
    resized = resized.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], width).to(table.dtype)
    return torch.cat([prefix, resized], dim=1)


class CrateVisionPatchEmbeddings(nn.Module):
    """Patches to tokens: patchify -> LN -> Linear -> LN (``"linear"``, official CRATE; a patch is flattened in
    ``(row, column, channel)`` order) or a ``P x P`` stride-``P`` convolution (``"conv"``)."""

    def __init__(self, config: CrateVisionConfig):
        super().__init__()
        self.patch_size, self.num_channels = config.patch_size, config.num_channels
        self.kind = config.patch_embedding_type
        patch_dim = config.patch_size**2 * config.num_channels
        if self.kind == "linear":
            self.input_norm = nn.LayerNorm(patch_dim, eps=config.layer_norm_eps)
            self.projection = nn.Linear(patch_dim, config.hidden_size)
            self.output_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        else:
            self.projection = nn.Conv2d(
                config.num_channels, config.hidden_size, config.patch_size, stride=config.patch_size
            )

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        if pixel_values.dim() != 4 or pixel_values.shape[1] != self.num_channels:
            raise ValueError(
                f"pixel_values must be (batch, {self.num_channels}, height, width), got shape "
                f"{tuple(pixel_values.shape)}"
            )
        batch, channels, height, width = pixel_values.shape
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"image size {height}x{width} is not a multiple of patch_size={p}")
        grid = (height // p, width // p)
        if self.kind == "conv":
            return self.projection(pixel_values).flatten(2).transpose(1, 2), grid
        patches = pixel_values.reshape(batch, channels, grid[0], p, grid[1], p).permute(0, 2, 4, 3, 5, 1)
        patches = patches.reshape(batch, grid[0] * grid[1], p * p * channels)
        return self.output_norm(self.projection(self.input_norm(patches))), grid


class CrateVisionEmbeddings(nn.Module):
    """Patch tokens, a learned CLS token in front, learned absolute positions ``(1, 1 + N, d)``."""

    def __init__(self, config: CrateVisionConfig):
        super().__init__()
        self.patch_embeddings = CrateVisionPatchEmbeddings(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.position_embeddings = nn.Parameter(torch.zeros(1, 1 + config.num_patches, config.hidden_size))
        self.dropout = nn.Dropout(config.embedding_dropout)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches, grid = self.patch_embeddings(pixel_values)
        tokens = torch.cat([self.cls_token.expand(patches.shape[0], -1, -1).to(patches.dtype), patches], dim=1)
        positions = interpolate_position_table(self.position_embeddings, grid)
        return self.dropout(tokens + positions.to(tokens.dtype))


@dataclass
class CrateVisionModelOutput(BaseModelOutputWithPooling):
    """``BaseModelOutputWithPooling`` plus, with ``output_sparse_codes=True``, per layer the ISTA code
    ``sparse_codes`` (for ToST the GELU activation) and ``subspace_projections`` (``w = LN(x) U``,
    ``(batch, heads, tokens, p)``): the inputs of the white-box measures."""

    sparse_codes: tuple[torch.Tensor, ...] | None = None
    subspace_projections: tuple[torch.Tensor, ...] | None = None


@dataclass
class CrateImageClassifierOutput(ImageClassifierOutput):
    """``ImageClassifierOutput`` plus the white-box tensors of [`CrateVisionModelOutput`]."""

    sparse_codes: tuple[torch.Tensor, ...] | None = None
    subspace_projections: tuple[torch.Tensor, ...] | None = None


class CrateVisionPreTrainedModel(CratePreTrainedModel):
    config_class = CrateVisionConfig
    config: CrateVisionConfig
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _auto_heads = {"AutoModel": "CrateVisionModel", "AutoModelForImageClassification": "CrateForImageClassification"}

    def _init_weights(self, module):
        """The LM's init for the layers (N(0, 0.02), depth-scaled residual outputs, Kaiming-uniform dictionaries);
        CLS token and position table truncated N(0, 0.02), as HF ViT."""
        super()._init_weights(module)
        if isinstance(module, CrateVisionEmbeddings):
            init.trunc_normal_(module.cls_token, std=self.config.initializer_range)
            init.trunc_normal_(module.position_embeddings, std=self.config.initializer_range)


class CrateVisionModel(CrateVisionPreTrainedModel):
    """The CRATE image encoder: embeddings, ``num_hidden_layers`` non-causal [`CrateLayer`]s and the head's
    LayerNorm. ``pooler_output`` is the normalised CLS token (or the normalised mean of all tokens)."""

    def __init__(self, config: CrateVisionConfig):
        super().__init__(config)
        self.embeddings = CrateVisionEmbeddings(config)
        self.layers = nn.ModuleList([CrateLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.final_layer_norm_eps, bias=config.layer_norm_bias)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.patch_embeddings

    @torch.no_grad()
    def resize_position_embeddings(self, image_size: int) -> None:
        """Interpolate the position table to ``image_size`` (a multiple of ``patch_size``) and record it in the
        config, so the model trains and saves at the new resolution (fine-tuning at a higher resolution)."""
        if image_size % self.config.patch_size:
            raise ValueError(f"image_size={image_size} is not a multiple of patch_size={self.config.patch_size}")
        side = image_size // self.config.patch_size
        table = interpolate_position_table(self.embeddings.position_embeddings.data, (side, side))
        self.embeddings.position_embeddings = nn.Parameter(table)
        self.config.image_size = image_size

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
        r"""``attentions`` (with ``output_attentions``): per MSSA layer the ``(batch, heads, 1 + N, 1 + N)`` attention
        weights (row 0 is the CLS token's map over the patches); per ToST layer the membership ``Pi``
        ``(batch, heads, 1 + N)``. ``interpolate_pos_encoding`` is accepted for HF ViT compatibility: positions are
        always interpolated when the patch grid differs from the training grid."""
        if pixel_values is None:
            raise ValueError("pixel_values is required")
        dtype = self.embeddings.patch_embeddings.projection.weight.dtype
        hidden_states = self.embeddings(pixel_values.to(dtype))
        all_hidden, all_attentions, all_codes, all_projections = [], [], [], []
        for layer in self.layers:
            if output_hidden_states:
                all_hidden.append(hidden_states)
            hidden_states, weights, projections, code = layer(hidden_states, output_attentions=bool(output_attentions))
            if output_attentions:
                all_attentions.append(weights)
            if output_sparse_codes:
                all_codes.append(code)
                all_projections.append(projections)
        if output_hidden_states:
            all_hidden.append(hidden_states)
        pooled = hidden_states[:, 0] if self.config.pooling == "cls" else hidden_states.mean(dim=1)
        output = CrateVisionModelOutput(
            last_hidden_state=self.norm(hidden_states),
            pooler_output=self.norm(pooled),
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_attentions) if output_attentions else None,
            sparse_codes=tuple(all_codes) if output_sparse_codes else None,
            subspace_projections=tuple(all_projections) if output_sparse_codes else None,
        )
        return output if _wants_dict(return_dict, self.config) else output.to_tuple()


class ImageClassifierForward:
    """The classifier forward pass shared by the CRATE-family image classifiers: the encoder (``self.model``), then
    ``self.classifier`` on its pooled output; the loss follows ``config.problem_type`` as in HF ViT."""

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        output_sparse_codes: bool | None = None,
        interpolate_pos_encoding: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CrateImageClassifierOutput | tuple:
        r"""``labels`` (batch,): class indices."""
        outputs = self.model(
            pixel_values,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            output_sparse_codes=output_sparse_codes,
            return_dict=True,
        )
        logits = self.classifier(outputs.pooler_output)
        loss = None
        if labels is not None:
            loss = self.loss_function(labels, logits, self.config, **kwargs)
        output = CrateImageClassifierOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            sparse_codes=outputs.sparse_codes,
            subspace_projections=outputs.subspace_projections,
        )
        return output if _wants_dict(return_dict, self.config) else output.to_tuple()


class CrateForImageClassification(ImageClassifierForward, CrateVisionPreTrainedModel):
    """[`CrateVisionModel`] and a linear classifier on its pooled output (the head ``LN -> Linear``)."""

    # The loss is the mean over this process's batch, not a sum over the global item count
    # (``num_items_in_batch``); without this, HF Trainer multiplies it by the number of processes.
    accepts_loss_kwargs = False

    def __init__(self, config: CrateVisionConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = CrateVisionModel(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embeddings.patch_embeddings


__all__ = [
    "CrateForImageClassification",
    "CrateVisionModel",
    "CrateVisionPreTrainedModel",
    "ImageClassifierForward",
    "interpolate_position_table",
]
