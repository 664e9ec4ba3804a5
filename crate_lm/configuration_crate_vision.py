"""Configuration of CRATE vision models (image classifiers built from the same white-box layers as the LMs).

Field names follow HF ViT (``image_size, patch_size, num_channels, hidden_size, num_hidden_layers,
num_attention_heads, num_labels``); the CRATE layer knobs are the LM's (see ``configuration_crate``):

| variant      | attention_type | ista_dictionary_ratio | ista_steps | ista_decoupled_decoder | ista_residual |
|--------------|----------------|-----------------------|------------|------------------------|---------------|
| CRATE        | mssa           | 1                     | 1          | False                  | False         |
| CRATE-alpha  | mssa           | 4                     | 2          | True                   | True          |
| ToST         | tssa           | (GELU MLP, not ISTA)  | -          | -                      | -             |

Attention is not causal: MSSA attends over all patches and the CLS token, and ToST's token statistics are sums
over all tokens (its vision form, without the causal LM's per-position bias).

This file is copied into every saved checkpoint (``trust_remote_code`` loading), with ``configuration_crate.py``.
"""

from transformers import PretrainedConfig

from .configuration_crate import CrateLayerKnobs, validate_crate_fields

POOLINGS = ("cls", "mean")
PATCH_EMBEDDINGS = ("linear", "conv")


class CrateVisionConfig(CrateLayerKnobs, PretrainedConfig):
    r"""Configuration of [`CrateVisionModel`] and [`CrateForImageClassification`].

    The defaults build CRATE-T/16 (6.09M parameters at 224x224 with 1000 classes): patchify -> LN -> Linear -> LN
    patch embedding, a CLS token, learned positions, 12 CRATE layers of width 384 with 6 heads, and a head
    ``LN -> Linear`` on the CLS token.

    Args:
        image_size (`int`): side of the (square) training images; position embeddings cover
            ``(image_size / patch_size)^2`` patches and are interpolated for other sizes.
        patch_size (`int`): side of a square patch.
        num_channels (`int`): 1 (greyscale) or 3 (RGB).
        hidden_size, num_hidden_layers, num_attention_heads, initializer_range: as in HF ViT.
        layer_norm_eps (`float`): eps of the LayerNorms inside the layers and of the patch embedding.
        final_layer_norm_eps (`float`, *optional*): eps of the head's LayerNorm; default ``layer_norm_eps``
            (the CRATE-alpha PyTorch port: layers 1e-6, head 1e-5).
        layer_norm_bias (`bool`): biases in the layers' and the head's LayerNorms.
        patch_embedding_type (`str`): ``"linear"`` (patchify, LN, Linear, LN: the official CRATE) or ``"conv"``
            (a stride-``patch_size`` convolution: the CRATE-alpha port and ViT).
        pooling (`str`): ``"cls"`` (the CLS token) or ``"mean"`` (mean over all tokens) feeds the head.
        attention_type, ista_dictionary_ratio, ista_steps, ista_decoupled_decoder, ista_residual, ista_step_size,
        ista_lambda, ista_dictionary_fan_in, attention_out_projection, attention_out_bias, mlp_ratio, mlp_bias,
        layer_scale_init, attention_dropout, residual_dropout, embedding_dropout: the CRATE layer knobs of
        [`CrateConfig`]. The official CRATE and CRATE-alpha drop the attention output projection when there is one
        head (``attention_out_projection=False``).
        num_labels, id2label, label2id: the classes (standard ``PretrainedConfig`` fields).
    """

    model_type = "crate_vision"
    # ToST's per-position bias belongs to the causal LM only; vision ToST normalises over all tokens.
    tssa_position_bias = False

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 16,
        num_channels: int = 3,
        hidden_size: int = 384,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 6,
        layer_norm_eps: float = 1e-5,
        initializer_range: float = 0.02,
        patch_embedding_type: str = "linear",
        pooling: str = "cls",
        attention_type: str = "mssa",
        ista_dictionary_ratio: int = 1,
        ista_steps: int = 1,
        ista_decoupled_decoder: bool = False,
        ista_residual: bool = False,
        ista_step_size: float = 0.1,
        ista_lambda: float = 0.1,
        ista_dictionary_fan_in: str = "dictionary_size",
        attention_out_projection: bool = True,
        attention_out_bias: bool = True,
        mlp_ratio: int = 4,
        mlp_bias: bool = True,
        layer_scale_init: float = 1e-5,
        final_layer_norm_eps: float | None = None,
        layer_norm_bias: bool = True,
        attention_dropout: float = 0.0,
        residual_dropout: float = 0.0,
        embedding_dropout: float = 0.0,
        **kwargs,
    ):
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
        self.patch_embedding_type = patch_embedding_type
        self.pooling = pooling
        self.attention_type = attention_type
        self.ista_dictionary_ratio = ista_dictionary_ratio
        self.ista_steps = ista_steps
        self.ista_decoupled_decoder = ista_decoupled_decoder
        self.ista_residual = ista_residual
        self.ista_step_size = ista_step_size
        self.ista_lambda = ista_lambda
        self.ista_dictionary_fan_in = ista_dictionary_fan_in
        self.attention_out_projection = attention_out_projection
        self.attention_out_bias = attention_out_bias
        self.mlp_ratio = mlp_ratio
        self.mlp_bias = mlp_bias
        self.layer_scale_init = layer_scale_init
        self.final_layer_norm_eps = layer_norm_eps if final_layer_norm_eps is None else final_layer_norm_eps
        self.layer_norm_bias = layer_norm_bias
        self.attention_dropout = attention_dropout
        self.residual_dropout = residual_dropout
        self.embedding_dropout = embedding_dropout
        super().__init__(**kwargs)
        self.validate_crate()

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def causal_attention(self) -> bool:
        return False

    def validate_crate(self) -> None:
        """Raise a one-line ``ValueError`` naming the field for any value the models cannot build."""
        name = type(self).__name__
        validate_crate_fields(self, name, extra_positive=("image_size", "patch_size"))
        if self.num_channels not in (1, 3):
            raise ValueError(f"{name}.num_channels={self.num_channels!r} is invalid: must be 1 or 3")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"{name}.image_size={self.image_size!r} is invalid: must be a multiple of patch_size={self.patch_size}"
            )
        if self.pooling not in POOLINGS:
            raise ValueError(f"{name}.pooling={self.pooling!r} is invalid: allowed values are {list(POOLINGS)}")
        if self.patch_embedding_type not in PATCH_EMBEDDINGS:
            raise ValueError(
                f"{name}.patch_embedding_type={self.patch_embedding_type!r} is invalid: allowed values "
                f"are {list(PATCH_EMBEDDINGS)}"
            )
