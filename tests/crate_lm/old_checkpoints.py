"""Checkpoints saved before the fidelity fields of issue 17 existed (``final_layer_norm``, ``final_layer_norm_eps``,
``layer_norm_bias``, ``mlp_bias``, ``attention_out_projection``, ``ista_dictionary_fan_in``, ``vocab_pad_multiple``):
their ``config.json`` as that code wrote it, their tensor names and shapes, and their logits on a fixed input.

The weights are not stored: every tensor is a fixed function of its name and shape (``deterministic_weights``), so
the fixture is small and any code can rebuild the same checkpoint. ``tests/crate_lm/test_old_checkpoints.py`` loads
each one with today's code and checks the same tensors and the same logits.

Regenerate (only ever from the code *before* the change, e.g. commit ab02504)::

    git worktree add /tmp/before ab02504
    PYTHONPATH=/tmp/before python -m tests.crate_lm.old_checkpoints   # run from this repository's root
"""

from __future__ import annotations

import json
import math
import tempfile
import zlib
from pathlib import Path

import torch

FIXTURE = Path(__file__).with_name("fixtures") / "checkpoints_before_issue17.json"

# (name, task, preset, overrides): the variants of the language and vision models, shrunk.
CASES = [
    ("crate", "causal-lm", "crate-test", {"vocab_size": 64}),
    ("crate-lm", "causal-lm", "crate-test", {"vocab_size": 64, "ista_dictionary_ratio": 4, "ista_steps": 2}),
    (
        "crate-alpha",
        "causal-lm",
        "crate-test",
        {
            "vocab_size": 64,
            "ista_dictionary_ratio": 4,
            "ista_steps": 2,
            "ista_decoupled_decoder": True,
            "ista_residual": True,
            "attention_out_bias": False,
        },
    ),
    ("tost", "causal-lm", "crate-test", {"vocab_size": 64, "attention_type": "tssa"}),
    ("vision-crate", "image-classification", "crate-vision-test", {}),
    ("vision-crate-one-head", "image-classification", "crate-vision-test", {"num_attention_heads": 1}),
    (
        "vision-crate-alpha",
        "image-classification",
        "crate-vision-test",
        {
            "patch_embedding_type": "conv",
            "ista_dictionary_ratio": 4,
            "ista_steps": 2,
            "ista_decoupled_decoder": True,
            "ista_residual": True,
            "attention_out_bias": False,
        },
    ),
]


def deterministic_weights(shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """A fixed tensor per name: ``0.3 sin(0.7 i + phase(name))`` over its flat index ``i`` (no RNG: the same on
    every machine and torch version), positive-leaning for LayerNorm-like vectors so the model stays well scaled."""
    weights = {}
    for name, shape in shapes.items():
        count = math.prod(shape)
        phase = zlib.crc32(name.encode()) % 1000 / 100.0
        values = 0.3 * torch.sin(torch.arange(count, dtype=torch.float64) * 0.7 + phase)
        if len(shape) == 1 and "norm" in name and name.endswith(".weight"):
            values = 1.0 + values
        weights[name] = values.reshape(shape).to(torch.float32)
    return weights


def fixture_input(task: str, config) -> torch.Tensor:
    """Token ids (1, 6) or pixels (2, C, H, W), fixed without an RNG."""
    if task == "causal-lm":
        return torch.tensor([[3, 17, 42, 8, 63, 25]])
    side, channels = config.image_size, config.num_channels
    grid = torch.arange(2 * channels * side * side, dtype=torch.float64).reshape(2, channels, side, side)
    return torch.cos(grid * 0.13).to(torch.float32)


def parameter_shapes(model: torch.nn.Module) -> dict[str, list[int]]:
    """Every parameter once (tied tensors under their first name), with its shape."""
    return {name: list(p.shape) for name, p in model.named_parameters(remove_duplicate=True)}


def main() -> None:
    import crate_lm

    cases = {}
    for name, task, preset, overrides in CASES:
        config = crate_lm.config_from_preset(preset, **overrides)
        model = crate_lm.model_for_config(config).eval()
        shapes = parameter_shapes(model)
        model.load_state_dict(deterministic_weights(shapes), strict=False)
        inputs = fixture_input(task, config)
        with torch.no_grad():
            logits = model(inputs).logits
        with tempfile.TemporaryDirectory() as directory:
            model.save_pretrained(directory)
            saved_config = json.loads((Path(directory) / "config.json").read_text())
        saved_config.pop("auto_map", None)  # remote code would load the old files, not today's
        cases[name] = {
            "task": task,
            "config": saved_config,
            "parameters": shapes,
            "logits": logits.double().tolist(),
        }
    FIXTURE.parent.mkdir(exist_ok=True)
    FIXTURE.write_text(json.dumps({"_about": __doc__.splitlines()[0], "cases": cases}, indent=1) + "\n")
    print(f"wrote {FIXTURE} ({FIXTURE.stat().st_size} bytes, {len(cases)} checkpoints)")


if __name__ == "__main__":
    main()
