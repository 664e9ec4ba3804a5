r"""``crate whitebox CHECKPOINT --data ...``: the per-layer white-box report of one HF checkpoint.

Does each layer do what the sparse rate reduction objective says it should? For a trained CRATE the compression
term falls and the sparse code gets sparser with depth (the CRATE book's layer curves). The measures come from
:mod:`crate_lm.whitebox` (nothing is recomputed here):

* **Compression term** ``R^c``. Take layer l's subspace projections ``w = LN(x) U_k`` of a sample's N tokens (for
  GPT-2 / ViT: the attention query, split into heads), scale each token's per-head vector to unit length, and sum
  the per-head coding rates ``R^c = sum_k 1/2 logdet(I + p / (N eps^2) W_k^T W_k)`` (eps^2 = 0.01, float64). Lower
  means the tokens are more compressed against the heads' subspaces. ``R`` is the rate of the K head vectors joined
  together, ``Delta R = R - R^c``.
* **Sparsity** of the layer's code ``a`` (CRATE: the ISTA output, ReLU zeros are exact; GPT-2 / ViT / ToST: the
  GELU MLP activation): ``sparsity_l0`` is the fraction of *non-zero* entries (lower is sparser), ``hoyer`` the
  scale-free ``(sqrt(s) - |a|_1 / |a|_2) / (sqrt(s) - 1)`` per token (higher is sparser; the only informative one
  for GELU codes, which are almost never exactly zero).

Each measure is per sample (a block of ``max_length`` tokens, or an image's CLS + patch tokens), averaged over the
samples; batches of ``batch_size`` are combined weighted by their size, ``rc_std`` pooled (the population standard
deviation over all samples).

Text data: a ``.txt`` file, a ``.jsonl`` file (``text`` fields) or a built-in corpus (its validation split) — the
documents of ``launcher.analysis.evaluate.read_evaluation_texts`` — tokenized with the checkpoint's tokenizer,
joined by EOS and cut into disjoint blocks; ``samples`` of them are taken evenly spaced over the stream (all of them
when there are fewer).
Image data: a folder ``DIR/CLASS/*.png`` (or ``fashion-mnist``, its test split), ``samples`` images evenly spaced
over the class-sorted files, made into ``pixel_values`` by the checkpoint's own image processor.

Written to ``--out`` (default: ``whitebox/`` beside the checkpoint, i.e. in its run directory): ``whitebox.json``
(rows and a summary), ``layers.png`` (R^c, Delta R, sparsity, Hoyer against depth; ``--compare`` checkpoints drawn
beside it, measured on the same data), ``heads.png`` (per-head R^c, layers x heads), ``whitebox.md`` (table and
figures) and, for image models, ``attention.png`` (CLS attention of each head in the last layer).
"""

from __future__ import annotations

import itertools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from data_pipeline.files import atomic_write
from launcher.architectures.registry import ARCHITECTURES, architecture
from launcher.errors import InputError, MissingInputError

DEFAULT_MAX_LENGTH = 128
SCALAR_KEYS = ("rc", "rate", "delta_r", "sparsity_l0", "hoyer", "pi_entropy")


@dataclass
class Checkpoint:
    """A checkpoint's config, how it reads data (tokenizer or image processor), a label, and its model once loaded."""

    path: str
    config: object
    processor: object
    label: str = ""
    model: torch.nn.Module | None = None

    @property
    def model_type(self) -> str:
        return self.config.model_type

    @property
    def is_vision(self) -> bool:
        return architecture(self.model_type).modality == "image"

    def load_model(self) -> torch.nn.Module:
        """The model (an LM or classifier head on top; the measures use its base model), in eval mode."""
        from transformers import (
            AutoModelForCausalLM,
            AutoModelForImageClassification,
            AutoModelForSequenceClassification,
        )
        from transformers.utils import logging

        if self.is_vision:
            loader = AutoModelForImageClassification
        else:
            architecture = (self.config.architectures or [""])[0]
            loader = (
                AutoModelForSequenceClassification
                if architecture.endswith("ForSequenceClassification")
                else AutoModelForCausalLM
            )
        bar = logging.is_progress_bar_enabled()
        logging.disable_progress_bar()  # keep stderr for errors
        try:
            self.model = loader.from_pretrained(self.path, dtype=torch.float32).eval()  # as saved in bf16 too
        finally:
            if bar:
                logging.enable_progress_bar()
        return self.model


# ----------------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------------


def _label(path: str) -> str:
    """The checkpoint's directory name; an export folder (``hf``, ``hf-step100``) with its run's name."""
    resolved = Path(path).resolve()
    name = resolved.name
    if name == "hf" or name.startswith("hf-"):
        name = f"{resolved.parent.name}/{name}"
    return name


def _require_config(path: str) -> None:
    if not (Path(path) / "config.json").is_file():
        raise MissingInputError(
            f"{path}: no config.json (an HF model directory is expected; export a run first: crate export RUN_DIR)"
        )


def open_checkpoint(path: str) -> Checkpoint:
    """Config and tokenizer / image processor of an HF export of a supported model type (one-line errors); the
    model itself loads later ([`Checkpoint.load_model`]), once the data is known to be usable."""
    _require_config(path)
    from transformers import AutoConfig

    import crate_lm  # noqa: F401  (registers the CRATE auto classes)

    config = AutoConfig.from_pretrained(path)
    measured = [entry.model_type for entry in ARCHITECTURES.values() if entry.whitebox is not None]
    if config.model_type not in measured:
        raise InputError(
            f"{path}: model type {config.model_type!r} is not supported (white-box measures exist for "
            f"{', '.join(measured)})"
        )
    vision = architecture(config.model_type).modality == "image"
    try:
        if vision:
            from transformers import AutoImageProcessor

            processor = AutoImageProcessor.from_pretrained(path)
        else:
            from transformers import AutoTokenizer

            processor = AutoTokenizer.from_pretrained(path)
    except OSError as error:  # nothing saved beside the model
        what = "image processor" if vision else "tokenizer"
        raise InputError(f"{path}: cannot load its {what} ({str(error).splitlines()[0]})") from error
    return Checkpoint(str(path), config, processor, _label(path))


# ----------------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------------


def _evenly_spaced(total: int, count: int) -> list[int]:
    """``count`` indices spread over ``range(total)`` from 0 (every index when ``count >= total``)."""
    count = min(count, total)
    return [i * total // count for i in range(count)]


def text_blocks(tokenizer, texts: list[str], samples: int, max_length: int) -> tuple[torch.Tensor, dict]:
    """``(samples, max_length)`` token blocks: the documents joined by EOS, cut into disjoint blocks, ``samples`` of
    them evenly spaced (the first one at token 0). Also ``{"blocks": [start token of each], "stream_tokens": n}``."""
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for index, text in enumerate(texts):
        if index and eos is not None:
            ids.append(eos)
        ids.extend(tokenizer(text, verbose=False)["input_ids"])
    total = len(ids) // max_length
    if total == 0:
        raise InputError(f"--data: {len(ids)} tokens, too few for one block of --max-length {max_length}")
    starts = [block * max_length for block in _evenly_spaced(total, samples)]
    blocks = torch.tensor([ids[start : start + max_length] for start in starts], dtype=torch.long)
    return blocks, {"blocks": starts, "stream_tokens": len(ids)}


def image_files(data: str) -> list:
    """The images of ``data`` in a fixed order: a class folder's files sorted by (class, path), or ``fashion-mnist``
    (its test split, as arrays)."""
    if data == "fashion-mnist":
        from data_pipeline.fashion_mnist import fashion_mnist

        return list(fashion_mnist("test")[0])
    if not Path(data).is_dir():
        raise InputError(f"--data: {data!r} is not an image folder (DIR/CLASS/*.png) nor fashion-mnist")
    from data_pipeline.image_sources import FolderCatalog

    catalog = FolderCatalog(data, "--data")
    return [os.path.join(catalog.root, rel) for rel in catalog.paths]


def image_batch(processor, files: list, samples: int) -> tuple[torch.Tensor, dict]:
    """``pixel_values`` of ``samples`` images evenly spaced over ``files`` (PIL RGB through the image processor, as
    a pipeline hands them over) and ``{"images": [their indices]}``."""
    import numpy as np
    from PIL import Image

    chosen = _evenly_spaced(len(files), samples)
    images = []
    for index in chosen:
        item = files[index]
        image = Image.fromarray(np.asarray(item)) if not isinstance(item, str) else Image.open(item)
        images.append(image.convert("RGB"))
    pixel_values = processor(images, return_tensors="pt")["pixel_values"]
    return pixel_values, {"images": chosen, "image_files": len(files)}


# ----------------------------------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------------------------------


def combine(batches: list[tuple[int, list[dict]]]) -> list[dict]:
    """Per-layer rows of several batches ``(size, rows)`` as one: means weighted by batch size (``rc_per_head``
    element-wise), ``rc_std`` pooled over all samples. One batch comes back unchanged."""
    if len(batches) == 1:
        return [dict(row) for row in batches[0][1]]
    total = sum(size for size, _ in batches)
    combined = []
    for layer_rows in zip(*(rows for _, rows in batches)):
        sizes = [size for size, _ in batches]
        row = {"layer": layer_rows[0]["layer"]}
        for key in SCALAR_KEYS:
            if key in layer_rows[0]:
                row[key] = sum(n * r[key] for n, r in zip(sizes, layer_rows)) / total
        variance = sum(n * (r["rc_std"] ** 2 + (r["rc"] - row["rc"]) ** 2) for n, r in zip(sizes, layer_rows)) / total
        row["rc_std"] = math.sqrt(variance)
        heads = zip(*(r["rc_per_head"] for r in layer_rows))
        row["rc_per_head"] = [sum(n * v for n, v in zip(sizes, values)) / total for values in heads]
        combined.append({key: row[key] for key in layer_rows[0]})  # measure()'s key order
    return combined


def measure_batches(model, inputs: torch.Tensor, batch_size: int) -> list[dict]:
    """The architecture's white-box measures (its registry entry's adapter) over ``inputs`` in batches of
    ``batch_size``, combined ([`combine`])."""
    measure = architecture(model.config.model_type).whitebox
    return combine([(len(chunk), measure(model, chunk)) for chunk in inputs.split(batch_size)])


def summarize(rows: list[dict]) -> dict:
    """First and last layer of R^c and sparsity, and whether they move the way CRATE's objective asks with depth
    (R^c down; the code sparser: fewer non-zeros, higher Hoyer)."""

    def steps(key):
        values = [row[key] for row in rows]
        return values, [b - a for a, b in itertools.pairwise(values)]

    rc, rc_steps = steps("rc")
    l0, l0_steps = steps("sparsity_l0")
    hoyer = [row["hoyer"] for row in rows]
    return {
        "rc_first": rc[0],
        "rc_last": rc[-1],
        "sparsity_l0_first": l0[0],
        "sparsity_l0_last": l0[-1],
        "hoyer_first": hoyer[0],
        "hoyer_last": hoyer[-1],
        "rc_decreases": rc[-1] < rc[0],
        "rc_decreases_every_layer": bool(rc_steps) and all(step < 0 for step in rc_steps),
        "sparsity_increases": l0[-1] < l0[0],  # fewer non-zeros
        "sparsity_increases_every_layer": bool(l0_steps) and all(step < 0 for step in l0_steps),
        "hoyer_increases": hoyer[-1] > hoyer[0],
    }


def _inputs(checkpoint: Checkpoint, texts, files, samples: int, max_length: int | None):
    """The checkpoint's inputs (its own tokenizer / image processor on the same documents or images) and a
    description of them."""
    if checkpoint.is_vision:
        pixel_values, info = image_batch(checkpoint.processor, files, samples)
        grid = [side // checkpoint.config.patch_size for side in pixel_values.shape[-2:]]
        info.update(
            samples=len(pixel_values),
            image_size=list(pixel_values.shape[-2:]),
            tokens=len(pixel_values) * (1 + grid[0] * grid[1]),
        )
        return pixel_values, info
    positions = getattr(checkpoint.config, "max_position_embeddings", None) or DEFAULT_MAX_LENGTH
    length = max_length or min(DEFAULT_MAX_LENGTH, positions)
    if length > positions:
        raise InputError(f"--max-length {length} exceeds {checkpoint.path}'s max_position_embeddings ({positions})")
    blocks, info = text_blocks(checkpoint.processor, texts, samples, length)
    info.update(samples=len(blocks), max_length=length, tokens=blocks.numel())
    return blocks, info


# ----------------------------------------------------------------------------------------------------------------------
# Figures and the report
# ----------------------------------------------------------------------------------------------------------------------


def save_heads_figure(series: dict[str, list[dict]], path: str | os.PathLike) -> Path:
    """Per-head R^c as a heat map (layers down, heads across), one panel per labelled series."""
    import numpy as np

    from launcher.metrics.figures import pyplot, save_figure

    plt = pyplot()
    panels = len(series)
    heads = max(len(rows[0]["rc_per_head"]) for rows in series.values())
    layers = max(len(rows) for rows in series.values())
    width, height = max(3.2, 0.55 * heads + 1.6), max(2.4, 0.4 * layers + 1.2)
    figure, axes = plt.subplots(1, panels, figsize=(width * panels, height), squeeze=False)
    for axis, (label, rows) in zip(axes[0], series.items()):
        matrix = np.array([row["rc_per_head"] for row in rows], dtype=np.float64)
        image = axis.imshow(matrix, cmap="viridis", aspect="auto", interpolation="nearest")
        axis.set_xticks(range(matrix.shape[1]), [str(k) for k in range(matrix.shape[1])], fontsize=7)
        axis.set_yticks(range(matrix.shape[0]), [str(row["layer"] + 1) for row in rows], fontsize=7)
        axis.set_xlabel("head", fontsize=8)
        axis.set_ylabel("layer", fontsize=8)
        axis.set_title(f"{label}: per-head R^c", fontsize=8)
        if matrix.size <= 256:
            middle = (matrix.max() + matrix.min()) / 2
            for i in range(matrix.shape[0]):
                for j in range(matrix.shape[1]):
                    axis.text(
                        j,
                        i,
                        f"{matrix[i, j]:.1f}",
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="black" if matrix[i, j] > middle else "white",
                    )
        figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04).ax.tick_params(labelsize=7)
    figure.tight_layout()
    try:
        return save_figure(figure, path)
    finally:
        plt.close(figure)


def markdown_table(rows: list[dict]) -> str:
    """Layer, R^c ± std, Delta R, sparsity (non-zero fraction), Hoyer (and ToST's H(Pi)) as a markdown table."""
    entropy = all("pi_entropy" in row for row in rows)
    header = "| layer | R^c ± std | ΔR | non-zero fraction (l0) | Hoyer |" + (" H(Π) |" if entropy else "")
    lines = [header, "|" + "---:|" * (6 if entropy else 5)]
    for row in rows:
        line = (
            f"| {row['layer'] + 1} | {row['rc']:.2f} ± {row['rc_std']:.2f} | {row['delta_r']:.2f} | "
            f"{row['sparsity_l0']:.3f} | {row['hoyer']:.3f} |"
        )
        lines.append(line + (f" {row['pi_entropy']:.3f} |" if entropy else ""))
    return "\n".join(lines)


def summary_line(summary: dict) -> str:
    def arrow(first, last, digits):
        return f"{summary[first]:.{digits}f} → {summary[last]:.{digits}f}"

    return (
        f"R^c {arrow('rc_first', 'rc_last', 2)} ({'decreases' if summary['rc_decreases'] else 'does not decrease'}"
        f"{', every layer' if summary['rc_decreases_every_layer'] else ''}); non-zero fraction "
        f"{arrow('sparsity_l0_first', 'sparsity_l0_last', 3)} (sparsity "
        f"{'increases' if summary['sparsity_increases'] else 'does not increase'}"
        f"{', every layer' if summary['sparsity_increases_every_layer'] else ''}); Hoyer "
        f"{arrow('hoyer_first', 'hoyer_last', 3)}"
    )


def _describe(entry: dict) -> str:
    if "max_length" in entry:
        return f"{entry['samples']} blocks of {entry['max_length']} tokens ({entry['tokens']} tokens)"
    side = "x".join(str(s) for s in entry["image_size"])
    return f"{entry['samples']} images of {side} ({entry['tokens']} tokens)"


def markdown_report(result: dict) -> str:
    lines = [
        f"# White-box report: {result['label']}",
        "",
        f"- model: `{result['model']}` ({result['model_type']})",
        f"- data: `{result['data']}`: {_describe(result)}",
        f"- {summary_line(result['summary'])}",
        "",
        (
            "R^c: compression term (sum of per-head coding rates of the unit-normalised subspace projections; lower "
            "is more compressed). l0: fraction of non-zero entries of the layer's code (lower is sparser). Hoyer: "
            "scale-free sparsity (higher is sparser)."
        ),
        "",
        markdown_table(result["layers"]),
        "",
    ]
    for other in result["compare"]:
        lines += [
            f"## Compared: {other['label']}",
            "",
            f"- model: `{other['model']}` ({other['model_type']}); {_describe(other)}",
            f"- {summary_line(other['summary'])}",
            "",
            markdown_table(other["layers"]),
            "",
        ]
    lines += ["## Figures", ""]
    for name, caption in (
        ("layers", "per-layer measures"),
        ("heads", "per-head R^c"),
        ("attention", "CLS attention, last layer"),
    ):
        if name in result["figures"]:
            lines += [f"![{caption}]({Path(result['figures'][name]).name})", ""]
    return "\n".join(lines)


def whitebox_report(
    checkpoint: str,
    data: str,
    out: str | None = None,
    samples: int = 16,
    max_length: int | None = None,
    batch_size: int = 8,
    compare: list[str] | tuple = (),
) -> dict:
    """Measure ``checkpoint`` (and each of ``compare``) on ``data``, write the report files; returns the JSON dict
    (with ``figures`` and ``files``: the paths written)."""
    if samples < 1:
        raise InputError(f"--samples must be >= 1, got {samples}")
    if batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {batch_size}")
    if max_length is not None and max_length < 1:
        raise InputError(f"--max-length must be >= 1, got {max_length}")
    for path in (checkpoint, *compare):  # every one-line error before any model loads
        _require_config(path)
    main = open_checkpoint(checkpoint)
    others = [open_checkpoint(path) for path in compare]
    for other in others:
        if other.is_vision != main.is_vision:
            kinds = {True: "an image model", False: "a language model"}
            raise InputError(
                f"--compare {other.path} is {kinds[other.is_vision]}, {checkpoint} "
                f"{kinds[main.is_vision]}: they cannot be measured on the same data"
            )
    texts = files = None
    if main.is_vision:
        files = image_files(data)
    else:
        from launcher.analysis.evaluate import read_evaluation_texts

        texts = read_evaluation_texts(data)

    prepared, labels = [], set()
    for item in [main, *others]:  # every data error before any model loads
        label, number = item.label, 2
        while label in labels:  # two checkpoints with the same name
            label, number = f"{item.label} #{number}", number + 1
        labels.add(label)
        prepared.append((item, label, *_inputs(item, texts, files, samples, max_length)))
    out_dir = Path(out) if out else Path(checkpoint).resolve().parent / "whitebox"
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for item, label, inputs, info in prepared:
        rows = measure_batches(item.load_model(), inputs, batch_size)
        entry = {
            "model": item.path,
            "model_type": item.model_type,
            "label": label,
            "data": data,
            **info,
            "batch_size": batch_size,
            "layers": rows,
            "summary": summarize(rows),
        }
        entries.append((item, inputs, entry))

    series = {f"{entry['model_type']} {entry['label']}": entry["layers"] for _, _, entry in entries}
    from launcher.metrics.figures import save_attention_figure, save_layer_curves

    figures = {
        "layers": str(
            save_layer_curves(
                series,
                out_dir / "layers.png",
                measures=("rc", "delta_r", "sparsity_l0", "hoyer"),
                title=f"white-box measures per layer on {data}",
            )
        ),
        "heads": str(save_heads_figure(series, out_dir / "heads.png")),
    }
    for index, (item, inputs, entry) in enumerate(entries):
        if item.is_vision:
            name = "attention.png" if index == 0 else f"attention-{index}.png"
            processor = item.processor
            channels = inputs.shape[1]
            mean = list(getattr(processor, "image_mean", None) or [0.0] * channels)
            std = list(getattr(processor, "image_std", None) or [1.0] * channels)
            path = save_attention_figure(item.model, inputs[:8], out_dir / name, mean=mean, std=std)
            entry["attention_figure"] = str(path)
            if index == 0:
                figures["attention"] = str(path)

    result = {**entries[0][2], "compare": [entry for _, _, entry in entries[1:]], "figures": figures}
    json_path, md_path = out_dir / "whitebox.json", out_dir / "whitebox.md"
    result["files"] = [
        str(json_path),
        str(md_path),
        *figures.values(),
        *(entry["attention_figure"] for _, _, entry in entries[1:] if "attention_figure" in entry),
    ]
    atomic_write(json_path, json.dumps(result, indent=2) + "\n")
    atomic_write(md_path, markdown_report(result) + "\n")
    return result


def console_text(result: dict) -> str:
    """What ``crate whitebox`` prints: the table(s), the summary and the files written."""
    lines = [
        f"{result['model_type']} {result['label']} on {result['data']}: {_describe(result)}",
        markdown_table(result["layers"]),
        summary_line(result["summary"]),
    ]
    for other in result["compare"]:
        lines += [
            "",
            f"{other['model_type']} {other['label']}: {_describe(other)}",
            markdown_table(other["layers"]),
            summary_line(other["summary"]),
        ]
    lines += ["", "wrote " + ", ".join(result["files"])]
    return "\n".join(lines)
