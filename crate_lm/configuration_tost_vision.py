"""Configuration of ToST vision models: the official image classifier of "Token Statistics Transformer" (Wu et al.,
2024; RobinWu218/ToST ``tost_vision/tost.py``), an XCiT-style skeleton around TSSA layers.

Skeleton: a convolutional stem (``log2(patch_size)`` stride-2 3x3 convolutions with BatchNorm, GELU between) turns
an image into a grid of tokens; a Fourier position encoding (sines and cosines of the normalised row and column,
projected by a 1x1 convolution) is added; ``num_hidden_layers`` non-causal TSSA layers run over the patch tokens
only; then a CLS token is prepended and ``num_class_attention_layers`` class-attention layers (CaiT) let it read
the patches; the head is ``LN -> Linear`` on the CLS token.

Field names follow HF ViT; the TSSA layer knobs are those of [`CrateConfig`] (``attention_type="tssa"``).

This file is copied into every saved checkpoint (``trust_remote_code`` loading), with ``configuration_crate.py``.
"""

from transformers import PretrainedConfig

from .configuration_crate import CrateLayerKnobs, validate_crate_fields


class ToSTVisionConfig(CrateLayerKnobs, PretrainedConfig):
    r"""Configuration of [`ToSTVisionModel`] and [`ToSTForImageClassification`].

    The defaults build the official ToST-S (``tost_cab_small_12_p16``: 22.6M parameters at 224x224 with 1000
    classes): width 384, 12 TSSA layers of 8 heads, 2 class-attention layers, patch 16, LayerScale 1.0.

    Args:
        image_size (`int`): side of the (square) training images. The Fourier positions are computed for any grid,
            so other sizes run too.
        patch_size (`int`): the stem's total stride, a power of two (the official models: 8 or 16); the stem has
            ``log2(patch_size)`` convolutions of widths ``d / 2^(k-1), ..., d / 2, d``.
        num_channels (`int`): 1 (greyscale) or 3 (RGB).
        hidden_size, num_hidden_layers, num_attention_heads, initializer_range: as in HF ViT.
        num_class_attention_layers (`int`): the class-attention layers after the TSSA layers (official: 2).
        mlp_ratio (`int`): width of every GELU MLP over ``hidden_size``.
        layer_norm_eps (`float`): eps of every LayerNorm (official: 1e-6).
        layer_scale_init (`float`): initial LayerScale of every residual branch (official: 1.0 at depth 12, 1e-5 at
            depth 24).
        qkv_bias (`bool`): a bias on the TSSA subspace projection and on the class attention's q, k, v projection
            (official: yes).
        position_encoding_dim (`int`): sine/cosine frequencies per axis of the Fourier position encoding (official:
            32, so 64 channels before the 1x1 projection); 0 turns the position encoding off.
        position_encoding_temperature (`float`): the longest wavelength of the Fourier encoding (official: 10000).
        class_attention_tokens_norm (`bool`): the class-attention layers' second LayerNorm normalises every token
            (official: yes), not only the CLS token.
        attention_dropout, residual_dropout, embedding_dropout (`float`): dropout probabilities (official: 0).
        num_labels, id2label, label2id: the classes (standard ``PretrainedConfig`` fields).
    """

    model_type = "tost_vision"
    # The fixed parts of a ToST layer, read by the shared layer code (``modeling_crate.CrateLayer``).
    attention_type = "tssa"
    tssa_position_bias = False
    attention_out_projection = True
    attention_out_bias = True
    mlp_bias = True
    layer_norm_bias = True
    ista_dictionary_ratio = 1
    ista_steps = 1
    ista_decoupled_decoder = False
    ista_residual = False
    ista_dictionary_fan_in = "dictionary_size"
    ista_step_size = 0.1
    ista_lambda = 0.1

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 16,
        num_channels: int = 3,
        hidden_size: int = 384,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 8,
        num_class_attention_layers: int = 2,
        mlp_ratio: int = 4,
        layer_norm_eps: float = 1e-6,
        layer_scale_init: float = 1.0,
        qkv_bias: bool = True,
        position_encoding_dim: int = 32,
        position_encoding_temperature: float = 10000.0,
        class_attention_tokens_norm: bool = True,
        initializer_range: float = 0.02,
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
        self.num_class_attention_layers = num_class_attention_layers
        self.mlp_ratio = mlp_ratio
        self.layer_norm_eps = layer_norm_eps
        self.layer_scale_init = layer_scale_init
        self.qkv_bias = qkv_bias
        self.position_encoding_dim = position_encoding_dim
        self.position_encoding_temperature = position_encoding_temperature
        self.class_attention_tokens_norm = class_attention_tokens_norm
        self.initializer_range = initializer_range
        self.attention_dropout = attention_dropout
        self.residual_dropout = residual_dropout
        self.embedding_dropout = embedding_dropout
        super().__init__(**kwargs)
        self.validate_crate()

    @property
    def subspace_bias(self) -> bool:
        """The TSSA subspace projection's bias (the official ``qkv`` Linear's)."""
        return self.qkv_bias

    @property
    def final_layer_norm_eps(self) -> float:
        """The head's LayerNorm eps: ``layer_norm_eps``, as every other norm of the official model."""
        return self.layer_norm_eps

    @property
    def causal_attention(self) -> bool:
        return False

    @property
    def stem_depth(self) -> int:
        """The number of stride-2 convolutions of the stem: ``log2(patch_size)``."""
        return self.patch_size.bit_length() - 1

    @property
    def num_patches(self) -> int:
        side = self.image_size
        for _ in range(self.stem_depth):
            side = (side + 1) // 2  # a 3x3 stride-2 convolution with padding 1
        return side * side

    def validate_crate(self) -> None:
        """Raise a one-line ``ValueError`` naming the field for any value the models cannot build."""
        name = type(self).__name__
        validate_crate_fields(self, name, extra_positive=("image_size", "patch_size"))
        if self.num_channels not in (1, 3):
            raise ValueError(f"{name}.num_channels={self.num_channels!r} is invalid: must be 1 or 3")
        if self.patch_size < 2 or self.patch_size & (self.patch_size - 1):
            raise ValueError(f"{name}.patch_size={self.patch_size!r} is invalid: must be a power of two >= 2")
        if self.hidden_size % (self.patch_size // 2):
            raise ValueError(
                f"{name}.hidden_size={self.hidden_size!r} is invalid: must be divisible by patch_size / 2 = "
                f"{self.patch_size // 2} (the widths of the convolutional stem)"
            )
        for field in ("num_class_attention_layers", "position_encoding_dim"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name}.{field}={value!r} is invalid: must be a non-negative integer")
        if self.position_encoding_dim % 2:
            raise ValueError(f"{name}.position_encoding_dim={self.position_encoding_dim!r} is invalid: must be even")


__all__ = ["ToSTVisionConfig"]
