"""Figures of a run, drawn with matplotlib (Agg: no display needed) and written atomically.

[`save_attention_figure`]: for a few images, the image and the CLS token's attention map of every head of the last
layer (``crate_lm.whitebox.cls_attention_maps``), upsampled to the image — the maps in which supervised CRATE's
heads segment objects while ViT's mostly do not.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from data_pipeline.files import atomic_file


def pyplot():
    """matplotlib's pyplot on the Agg backend (figures are files; no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: str | os.PathLike) -> Path:
    """Write ``figure`` as PNG beside ``path`` and move it into place (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as handle:
        figure.savefig(handle, format="png", dpi=100, bbox_inches="tight")
    return path


def save_and_close(figure, path: str | os.PathLike) -> Path:
    """Lay ``figure`` out tightly, write it (``save_figure``) and free it."""
    figure.tight_layout()
    try:
        return save_figure(figure, path)
    finally:
        pyplot().close(figure)


def save_attention_figure(
    model,
    pixel_values: torch.Tensor,
    path: str | os.PathLike,
    is_main: bool = True,
    mean: Sequence[float] = (0.0,),
    std: Sequence[float] = (1.0,),
    layer: int = -1,
) -> Path | None:
    """One row per image: the image (un-normalised with ``mean`` / ``std``), then each head's CLS attention map.
    Every rank must call it under ZeRO-3 (the forward pass gathers parameters); only ``is_main`` draws."""
    from crate_lm.whitebox import cls_attention_maps

    maps = cls_attention_maps(model, pixel_values, layer=layer).cpu()
    if not is_main:
        return None
    plt = pyplot()
    images = pixel_values.detach().float().cpu() * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    images = images.clamp(0, 1)
    rows, heads = maps.shape[:2]
    figure, axes = plt.subplots(rows, heads + 1, figsize=(1.4 * (heads + 1), 1.4 * rows), squeeze=False)
    for row in range(rows):
        image = images[row]
        axes[row][0].imshow(
            (image[0] if image.shape[0] == 1 else image.permute(1, 2, 0)).numpy(),
            cmap="gray" if image.shape[0] == 1 else None,
        )
        for head in range(heads):
            axes[row][head + 1].imshow(maps[row, head].numpy(), cmap="inferno")
            if row == 0:
                axes[row][head + 1].set_title(f"head {head}", fontsize=7)
        for axis in axes[row]:
            axis.set_axis_off()
    kind = getattr(model.config, "model_type", "model")
    figure.suptitle(f"{kind}: CLS attention, layer {layer if layer >= 0 else 'last'}", fontsize=8)
    try:
        return save_figure(figure, path)
    finally:
        plt.close(figure)


LAYER_MEASURES = {  # white-box row key -> axis label (crate_lm.whitebox's per-layer records)
    "rc": "compression term R^c (lower: more compressed)",
    "delta_r": "rate reduction ΔR = R − R^c",
    "sparsity_l0": "ℓ0: fraction of non-zeros (lower: sparser)",
    "hoyer": "Hoyer sparsity (scale-free)",
}


def save_layer_curves(
    series: dict[str, list[dict]],
    path: str | os.PathLike,
    measures: Sequence[str] = ("rc", "sparsity_l0"),
    title: str = "",
) -> Path:
    """One panel per measure: its value against layer for each labelled series of per-layer records (e.g. CRATE
    and GPT-2 side by side). An ``rc`` panel shows ``rc_std`` as error bars where present."""
    plt = pyplot()
    figure, axes = plt.subplots(1, len(measures), figsize=(4.2 * len(measures), 3.2), squeeze=False)
    for axis, measure in zip(axes[0], measures):
        for label, rows in series.items():
            rows = sorted((row for row in rows if row.get(measure) is not None), key=lambda row: row["layer"])
            if not rows:
                continue
            layers = [row["layer"] + 1 for row in rows]
            values = [row[measure] for row in rows]
            errors = [row.get(f"{measure}_std", 0.0) for row in rows] if measure == "rc" else None
            axis.errorbar(layers, values, yerr=errors, marker="o", markersize=3, capsize=2, label=label)
        axis.set_xlabel("layer")
        axis.xaxis.get_major_locator().set_params(integer=True)
        axis.set_ylabel(LAYER_MEASURES.get(measure, measure), fontsize=8)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    try:
        return save_figure(figure, path)
    finally:
        plt.close(figure)
