"""Configuration of CRATE language models (white-box transformers built by unrolling sparse rate reduction).

One config covers the whole published family; the variant is chosen by a few knobs:

| variant      | attention_type | ista_dictionary_ratio | ista_steps | ista_decoupled_decoder | ista_residual |
|--------------|----------------|-----------------------|------------|------------------------|---------------|
| CRATE        | mssa           | 1                     | 1          | False                  | False         |
| CRATE-LM     | mssa           | 4                     | 2          | False                  | False         |
| CRATE-alpha  | mssa           | 4                     | 2          | True                   | True          |
| ToST         | tssa           | (GELU MLP, not ISTA)  | -          | -                      | -             |

The remaining fields say how a released model was built where the codes differ: a final LayerNorm or not, the
LayerNorm eps of the block norms and of the final (head) norm, biases per family of layers, the attention output
projection, the fan-in of the dictionaries' Kaiming init, and the padding of the vocabulary. Their defaults are the
behaviour of the models saved before these fields existed (so an older ``config.json``, which lacks them, loads as
it was trained); the published presets (``presets.json``) set the official values explicitly.

This file is also copied into every saved checkpoint (``trust_remote_code`` loading), so it imports only
``transformers``.
"""

from transformers import PretrainedConfig

ATTENTION_TYPES = ("mssa", "tssa")

# The fields that decide a layer's structure, at their defaults (Causal-CRATE).
_STRUCTURAL_DEFAULTS = {
    "attention_type": "mssa",
    "ista_dictionary_ratio": 1,
    "ista_steps": 1,
    "ista_decoupled_decoder": False,
    "ista_residual": False,
}

# The knobs that make each published variant (the other fields keep their defaults).
VARIANT_KNOBS: dict[str, dict] = {
    "crate": {},
    "crate-lm": {"ista_dictionary_ratio": 4, "ista_steps": 2},
    "crate-alpha": {
        "ista_dictionary_ratio": 4,
        "ista_steps": 2,
        "ista_decoupled_decoder": True,
        "ista_residual": True,
        "attention_out_bias": False,
    },
    "tost": {"attention_type": "tssa"},
}
DICTIONARY_RATIOS = (1, 4)
ISTA_STEPS = (1, 2)
# Whose width is the fan-in of the dictionaries' Kaiming-uniform init, bound sqrt(6 / fan_in): the dictionary width s
# (torch's rule for our (d, s) storage) or the hidden size d (the official CRATE-LM's (s, d) storage, CRATE-alpha's
# flax kernel (d, s)). The two agree for a complete dictionary.
DICTIONARY_FAN_INS = ("dictionary_size", "hidden_size")


class CrateLayerKnobs:
    """Derived sizes of the CRATE layer knobs, shared by the language and vision configs."""

    # No bias on the subspace projection U (every official CRATE and the ToST LM); ToST vision has one.
    subspace_bias = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def dictionary_size(self) -> int:
        """Width of the sparse code (the number of dictionary atoms)."""
        return self.ista_dictionary_ratio * self.hidden_size

    @property
    def variant(self) -> str:
        """The published family member this configuration is, or ``"custom"``."""
        return structural_variant(self)

    @property
    def dictionary_fan_in(self) -> int:
        """The fan-in of the dictionaries' Kaiming-uniform init (see ``ista_dictionary_fan_in``)."""
        return self.hidden_size if self.ista_dictionary_fan_in == "hidden_size" else self.dictionary_size


class CrateConfig(CrateLayerKnobs, PretrainedConfig):
    r"""Configuration of [`CrateModel`], [`CrateForCausalLM`] and [`CrateForSequenceClassification`].

    The defaults build CRATE layers at Causal-CRATE-Base's shape in the GPT-2 skeleton (learned absolute positions,
    pre-LN, a final LN, tied LM head, the GPT-2 vocabulary unpadded): the models saved before the fidelity fields
    existed. The released Causal-CRATE-Base has no final LN and a vocabulary padded to 50304: the preset
    ``causal-crate-base`` (``config_from_preset``) builds it.

    Args:
        vocab_size (`int`): the tokenizer's size: the ids the model reads and the width of its logits.
        hidden_size, num_hidden_layers, num_attention_heads, max_position_embeddings, initializer_range,
        tie_word_embeddings, bos/eos/pad_token_id: as in HF GPT-2 (under the modern names).
        layer_norm_eps (`float`): eps of the LayerNorms inside the layers (block norms).
        final_layer_norm_eps (`float`, *optional*): eps of the final LayerNorm; default ``layer_norm_eps``
            (CRATE-alpha: blocks 1e-6, final 1e-5).
        final_layer_norm (`bool`): a LayerNorm between the last layer and the LM head (CRATE-LM, ToST: yes; the
            released Causal-CRATE: no, the last ISTA output feeds the head).
        layer_norm_bias (`bool`): biases in every LayerNorm (ToST's official training: no).
        vocab_pad_multiple (`int`): pad the embedding table (and the tied head) to a multiple of this many rows
            (the nanoGPT-derived codes: 64, 50257 -> 50304). Logits keep ``vocab_size`` columns: the padded rows
            are never scored, sampled or in the loss's softmax.
        attention_type (`str`): ``"mssa"`` (multi-head subspace self-attention, q = k = v) or ``"tssa"``
            (token-statistics self-attention of ToST, linear time, with a GELU MLP instead of ISTA).
        ista_dictionary_ratio (`int`): dictionary width over ``hidden_size``: 1 (complete) or 4 (overcomplete).
        ista_steps (`int`): proximal steps: 1 (warm start at the input) or 2 (start from zero).
        ista_decoupled_decoder (`bool`): decode the sparse code with a separate dictionary (CRATE-alpha).
        ista_residual (`bool`): add the decoded sparse code to the residual stream (CRATE-alpha).
        ista_step_size (`float`): the ISTA step size eta (a constant, not learned).
        ista_lambda (`float`): the sparsity weight lambda of the LASSO (a constant, not learned).
        ista_dictionary_fan_in (`str`): the fan-in of the dictionaries' Kaiming-uniform init (bound
            ``sqrt(6 / fan_in)``): ``"dictionary_size"`` (s) or ``"hidden_size"`` (d, the official CRATE-LM and
            CRATE-alpha trainings). The same for a complete dictionary.
        attention_out_projection (`bool`): the learned output projection ``U_out`` of the attention (the official
            vision CRATE drops it when there is one head).
        attention_out_bias (`bool`): bias on the attention output projection (CRATE, CRATE-LM: yes; CRATE-alpha,
            ToST's official training: no).
        mlp_ratio (`int`): width of the ToST GELU MLP over ``hidden_size``.
        mlp_bias (`bool`): biases of the ToST GELU MLP (ToST's official training: no).
        layer_scale_init (`float`): initial value of ToST's per-channel residual scales (LayerScale).
        tssa_position_bias (`bool`): the learned per-position bias inside ToST's causal normalisation (official LM).
        attention_dropout, residual_dropout, embedding_dropout (`float`): dropout probabilities.
    """

    model_type = "crate"
    keys_to_ignore_at_inference = ["cache"]

    def __init__(
        self,
        vocab_size: int = 50257,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        max_position_embeddings: int = 1024,
        layer_norm_eps: float = 1e-5,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = True,
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
        tssa_position_bias: bool = True,
        final_layer_norm: bool = True,
        final_layer_norm_eps: float | None = None,
        layer_norm_bias: bool = True,
        vocab_pad_multiple: int = 1,
        attention_dropout: float = 0.0,
        residual_dropout: float = 0.0,
        embedding_dropout: float = 0.0,
        use_cache: bool = True,
        bos_token_id: int | None = 50256,
        eos_token_id: int | None = 50256,
        pad_token_id: int | None = None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
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
        self.tssa_position_bias = tssa_position_bias
        self.final_layer_norm = final_layer_norm
        self.final_layer_norm_eps = layer_norm_eps if final_layer_norm_eps is None else final_layer_norm_eps
        self.layer_norm_bias = layer_norm_bias
        self.vocab_pad_multiple = vocab_pad_multiple
        self.attention_dropout = attention_dropout
        self.residual_dropout = residual_dropout
        self.embedding_dropout = embedding_dropout
        self.use_cache = use_cache
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self.validate_crate()

    @property
    def causal_attention(self) -> bool:
        """Language models attend to the past only (the vision config answers False)."""
        return True

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding table and the tied LM head: ``vocab_size`` rounded up to ``vocab_pad_multiple``."""
        return -(-self.vocab_size // self.vocab_pad_multiple) * self.vocab_pad_multiple

    def validate_crate(self) -> None:
        """Raise a one-line ``ValueError`` naming the field for any value the models cannot build."""
        validate_crate_fields(
            self, type(self).__name__, extra_positive=("vocab_size", "max_position_embeddings", "vocab_pad_multiple")
        )


def validate_crate_fields(config, class_name: str, extra_positive: tuple[str, ...] = ()) -> None:
    """The checks every CRATE-family config shares (the layer knobs); one-line ``ValueError`` naming the field."""

    def fail(field: str, value, allowed: str) -> None:
        raise ValueError(f"{class_name}.{field}={value!r} is invalid: {allowed}")

    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "mlp_ratio") + extra_positive:
        value = getattr(config, field)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            fail(field, value, "must be a positive integer")
    if config.hidden_size % config.num_attention_heads:
        fail(
            "hidden_size", config.hidden_size, f"must be divisible by num_attention_heads={config.num_attention_heads}"
        )
    if config.attention_type not in ATTENTION_TYPES:
        fail("attention_type", config.attention_type, f"allowed values are {list(ATTENTION_TYPES)}")
    if config.ista_dictionary_ratio not in DICTIONARY_RATIOS:
        fail("ista_dictionary_ratio", config.ista_dictionary_ratio, f"allowed values are {list(DICTIONARY_RATIOS)}")
    if config.ista_steps not in ISTA_STEPS:
        fail("ista_steps", config.ista_steps, f"allowed values are {list(ISTA_STEPS)}")
    if config.ista_dictionary_ratio != 1 and config.ista_steps == 1:
        # One warm-started step needs a square dictionary: z + eta D^T (z - D z) mixes widths d and s.
        fail(
            "ista_steps",
            config.ista_steps,
            "must be 2 when ista_dictionary_ratio is 4 (the 1-step warm start needs a square dictionary)",
        )
    if config.attention_type == "tssa":
        ista_knobs = (
            config.ista_dictionary_ratio,
            config.ista_steps,
            config.ista_decoupled_decoder,
            config.ista_residual,
        )
        if ista_knobs != (1, 1, False, False):
            fail(
                "attention_type",
                "tssa",
                "ToST layers use a GELU MLP, not ISTA: leave ista_dictionary_ratio=1, "
                "ista_steps=1, ista_decoupled_decoder=False, ista_residual=False",
            )
    if config.ista_dictionary_fan_in not in DICTIONARY_FAN_INS:
        fail("ista_dictionary_fan_in", config.ista_dictionary_fan_in, f"allowed values are {list(DICTIONARY_FAN_INS)}")
    for field in ("ista_step_size", "layer_norm_eps", "final_layer_norm_eps", "initializer_range"):
        if not float(getattr(config, field)) > 0:
            fail(field, getattr(config, field), "must be > 0")
    if float(config.ista_lambda) < 0:
        fail("ista_lambda", config.ista_lambda, "must be >= 0")
    for field in ("attention_dropout", "residual_dropout", "embedding_dropout"):
        if not 0.0 <= float(getattr(config, field)) < 1.0:
            fail(field, getattr(config, field), "must be in [0, 1)")


def structural_variant(config) -> str:
    """The published family member a config's layer knobs make, or ``"custom"``."""
    for name, knobs in VARIANT_KNOBS.items():
        expected = {**_STRUCTURAL_DEFAULTS, **knobs}
        if all(getattr(config, key) == expected[key] for key in _STRUCTURAL_DEFAULTS):
            return name
    return "custom"
