"""The model card (``README.md``) written into every export: what an HF user expects to find beside the weights —
the architecture and preset, the parameter count, the data and tokens seen, the final losses and how to load it.

The facts come from the run config and ``<output_dir>/metrics.jsonl`` (its ``start`` row, the last train and eval
rows at or before the exported step); what a run did not record is left out rather than guessed.
"""

from __future__ import annotations

from pathlib import Path

from launcher.config.run import RunConfig
from launcher.metrics.logger import read_metrics

_PIPELINE_TAGS = {
    "causal-lm": "text-generation",
    "sequence-classification": "text-classification",
    "image-classification": "image-classification",
}
_AUTO_CLASS = {
    "causal-lm": "AutoModelForCausalLM",
    "sequence-classification": "AutoModelForSequenceClassification",
    "image-classification": "AutoModelForImageClassification",
}


def _source_names(config: RunConfig) -> list[str]:
    names = []
    for source in config.data.sources:
        origin = next((getattr(source, key) for key in source.ORIGINS if getattr(source, key, None)), None)
        names.append(f"`{origin}`")
    return names


def _run_facts(output_dir: Path, step: int) -> dict:
    """From metrics.jsonl: tokens or samples per step, and the last train and eval losses at or before ``step``."""
    rows = read_metrics(output_dir) if (output_dir / "metrics.jsonl").is_file() else []
    rows = [row for row in rows if row.get("step", 0) <= step]
    start = next((row for row in reversed(rows) if row.get("event") == "start"), {})
    train = next((row for row in reversed(rows) if row["kind"] == "train" and "loss" in row and "event" not in row), {})
    evaluation = next((row for row in reversed(rows) if row["kind"] == "eval" and "loss" in row), {})
    return {"start": start, "train": train, "eval": evaluation}


def model_card(config: RunConfig, model, step: int, output_dir: str | Path) -> str:
    """The export's ``README.md`` for ``model`` (the HF model written) at optimizer step ``step`` of the run in
    ``output_dir``."""
    from crate_lm import count_parameters

    facts = _run_facts(Path(output_dir), step)
    model_config = model.config
    model_type = model_config.model_type
    task = config.task
    auto_class = _AUTO_CLASS.get(task, "AutoModel")
    preset = f"preset `{config.model.preset}`" if config.model.preset else "a custom shape (no preset)"
    shape = ", ".join(
        f"{key} {getattr(model_config, key)}"
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "image_size")
        if getattr(model_config, key, None) is not None
    )
    total = sum(p.numel() for p in model.parameters())
    counted = count_parameters(model)
    lines = [
        "---",
        "library_name: transformers",
        f"pipeline_tag: {_PIPELINE_TAGS.get(task, 'feature-extraction')}",
        "tags:",
        *[f"- {tag}" for tag in dict.fromkeys([model_type, "crate", "white-box"])],
        "---",
        "",
        f"# {type(model).__name__} ({config.model.preset or model_type}), trained with crate",
        "",
        "## Model",
        f"- Architecture: `{type(model).__name__}` (`model_type: {model_type}`), {preset}: {shape}.",
        f"- Parameters: {total:,} ({counted:,} without the position table, as the CRATE and ToST LM sizes are quoted).",
    ]
    if config.model.init_from:
        lines.append(f"- Fine-tuned from `{config.model.init_from}`.")
    lines += [
        "",
        "## Training",
        f"- Task `{task}`, {step:,} optimizer steps; data: {', '.join(_source_names(config))}.",
    ]
    start = facts["start"]
    if start.get("tokens_per_step") and task != "image-classification":
        lines.append(f"- Tokens seen: {step * start['tokens_per_step']:,} ({start['tokens_per_step']:,} per step).")
    elif start.get("samples_per_step"):
        lines.append(f"- Samples seen: {step * start['samples_per_step']:,} ({start['samples_per_step']:,} per step).")
    if facts["train"]:
        lines.append(f"- Final training loss: {facts['train']['loss']:.4f} (step {facts['train']['step']}).")
    if facts["eval"]:
        lines.append(f"- Final validation loss: {facts['eval']['loss']:.4f} (step {facts['eval']['step']}).")
    loader = "AutoImageProcessor" if task == "image-classification" else "AutoTokenizer"
    lines += [
        "",
        "## Use",
        "The modeling code is stored beside the weights, so a plain `transformers` install loads it:",
        "",
        "```python",
        f"from transformers import {auto_class}, {loader}",
        "",
        f'model = {auto_class}.from_pretrained("PATH", trust_remote_code=True)',
        f'processor = {loader}.from_pretrained("PATH", trust_remote_code=True)',
        "```",
        "",
        "`AutoModel` and the other heads of the family load the same way. With the `crate` package installed,"
        " `import crate_lm` registers the classes and `trust_remote_code` is not needed.",
        "",
    ]
    return "\n".join(lines)
