"""The text models whose training path runs softmax attention through SDPA (ToST's TSSA runs none), built through
the registry at a small shape flash attention can serve (head size 64), for the attention-kernel tests."""

from __future__ import annotations

from launcher.config.run import ModelSection
from launcher.models.build import build_model, build_model_config

VOCAB, SEQ_LEN = 512, 128

# (arch, preset): Causal-CRATE's MSSA, CRATE-alpha's, and the two HF baselines
SDPA_MODELS = [("crate", "causal-crate-base"), ("crate", "crate-alpha-lm-base"), ("gpt2", None), ("llama", None)]


def tiny_text_model(arch: str, preset: str | None):
    """A fresh causal LM of ``arch`` (from ``preset`` when given), d 256 with 4 heads of 64, 2 layers."""
    section = ModelSection(
        arch=arch,
        preset=preset,
        hidden_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=SEQ_LEN,
    )
    return build_model(build_model_config(section, VOCAB, 0, SEQ_LEN)).train()
