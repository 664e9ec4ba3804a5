"""HF export: ``<output_dir>/hf/`` holds safetensors, config, generation config, the preprocessor (the tokenizer, or
for image runs the image processor) and, for CRATE, the modeling code (``auto_map``), so
``AutoModelForCausalLM`` / ``AutoModelForImageClassification.from_pretrained(<output_dir>/hf)`` just works. A LoRA
run's export is merged; its adapter folder (PEFT's) goes to ``<output_dir>/adapter/``.

ZeRO-3 partitions the parameters over ranks: every rank enters the gather, rank 0 writes. The directory is written
beside the old one and swapped in, so a crash mid-export never leaves a half-written ``hf/``.

An export replaces only what is an export: every one holds a small ``crate_export.json``, and a directory is written
only if it is missing, empty or an earlier export (see [`export_target_problem`]); anything else is refused with a
one-line error naming it, so no export deletes files it did not write.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path

from data_pipeline.files import write_directory
from launcher.errors import InputError

EXPORT_MARKER = "crate_export.json"
# What an HF save_pretrained (model, tokenizer, image processor, PEFT adapter) writes: exports from before the marker
# are recognised by holding nothing else.
_HF_SAVE_SUFFIXES = frozenset({".json", ".safetensors", ".py", ".txt", ".model", ".jinja", ".md"})


def is_export(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds an export written here: it has ``crate_export.json``, or (an export written before
    the marker) it is flat, has ``config.json`` or ``adapter_config.json`` and a ``.safetensors`` file, and holds only
    the kinds of file an HF save writes."""
    directory = Path(directory)
    if (directory / EXPORT_MARKER).is_file():
        return True
    entries = list(directory.iterdir())
    names = {entry.name for entry in entries}
    return (
        bool(names & {"config.json", "adapter_config.json"})
        and any(entry.suffix == ".safetensors" for entry in entries)
        and all(entry.is_file() and entry.suffix in _HF_SAVE_SUFFIXES for entry in entries)
    )


def export_target_problem(directory: str | os.PathLike) -> str | None:
    """``None`` if an export may be written to ``directory``: it is missing, empty, or an earlier export (which the
    new one replaces); else why not, naming it."""
    directory = Path(directory)
    if not directory.exists():
        return None
    if not directory.is_dir():
        return f"{directory} is a file"
    if next(directory.iterdir(), None) is None or is_export(directory):
        return None
    return f"{directory} is not empty and not a crate export"


def _write_export(directory: Path, kind: str, save: Callable[[Path], None]) -> None:
    """``save(staging)`` writes the export, then the marker goes beside it and the whole replaces ``directory``."""
    problem = export_target_problem(directory)
    if problem is not None:  # checked before the run or the export started; this catches what appeared since
        raise InputError(f"export: {problem}; choose another directory")

    def write(staging: Path) -> None:
        save(staging)
        (staging / EXPORT_MARKER).write_text(json.dumps({"written_by": "crate", "kind": kind}) + "\n")

    write_directory(directory, write)


def adapter_dir_for(out_dir: str | os.PathLike) -> Path:
    """Where a LoRA run's adapter goes beside its merged export: ``adapter/`` beside ``hf/``, else
    ``<name>-adapter``."""
    out = Path(out_dir)
    return out.with_name("adapter" if out.name == "hf" else f"{out.name}-adapter")


def _detached_peft_copy(model):
    """A PEFT model's copy outside any engine: the same architecture and adapter config on the meta device, given
    this model's (gathered) weights. Merging it leaves the training model untouched."""
    import copy

    import torch
    from peft import get_peft_model

    base = model.get_base_model()
    adapter = copy.deepcopy(model.peft_config["default"])
    with torch.device("meta"):
        fresh = type(base)(base.config)
        fresh.name_or_path = base.name_or_path
        fresh = get_peft_model(fresh, adapter)
    fresh.load_state_dict(
        {name: tensor.detach().to("cpu", copy=True) for name, tensor in model.state_dict().items()}, assign=True
    )
    fresh.get_base_model().tie_weights()  # the copied state holds tied weights as two tensors
    return fresh


def export_hf(
    model,
    processor,
    out_dir: str | os.PathLike,
    is_main: bool,
    zero_stage: int = 0,
    save_adapter: bool = False,
    card: Callable[[object], str] | None = None,
) -> None:
    """Write ``model`` and its preprocessor as an HF checkpoint, with ``card(hf_model)`` as its ``README.md``. A PEFT
    (LoRA) model is written merged into its base weights; with ``save_adapter`` its adapter folder (PEFT's
    ``save_pretrained``) goes to ``adapter_dir_for``."""
    out = Path(out_dir)
    gather = contextlib.nullcontext()
    if zero_stage == 3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
    with gather:
        if not is_main:
            return
        if hasattr(model, "peft_config"):
            adapted = _detached_peft_copy(model)
            if save_adapter:
                _write_export(
                    adapter_dir_for(out),
                    "adapter",
                    lambda staging: (adapted.save_pretrained(staging), processor.save_pretrained(staging)),
                )
            model = adapted.merge_and_unload()
            model.tie_weights()

        def save(staging: Path) -> None:
            model.save_pretrained(staging, safe_serialization=True)
            processor.save_pretrained(staging)
            if card is not None:
                (staging / "README.md").write_text(card(model))

        _write_export(out, "model", save)


def consolidated_state_dict(checkpoint_dir: Path, zero_stage: int, trust_pickles: bool = False) -> dict:
    """Full fp32 weights from one DeepSpeed checkpoint directory: ZeRO 1-3 partitions of the fp32 master weights are
    merged (DeepSpeed's own ``zero_to_fp32``); without ZeRO the module's weights are stored whole. The files are
    read with the restricted unpickler unless ``trust_pickles`` (``launcher.train.safe_loading``)."""
    import torch

    from launcher.train.safe_loading import check_checkpoint_pickles, restricted_unpickling

    check_checkpoint_pickles(checkpoint_dir, trust_pickles)
    with restricted_unpickling(trust_pickles):
        if zero_stage == 0:
            return torch.load(checkpoint_dir / "mp_rank_00_model_states.pt", map_location="cpu")["module"]
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir.parent), tag=checkpoint_dir.name)


def export_checkpoint(
    run_dir: str | os.PathLike,
    step: int | None = None,
    out: str | os.PathLike | None = None,
    trust_pickles: bool = False,
) -> Path:
    """``crate export``: the HF model of a run's checkpoint (the newest valid one, or ``step``), written to ``out``
    (default ``<run_dir>/hf`` for the newest, ``<run_dir>/hf-step<N>`` for an older step). One process, no
    process group: ZeRO-3 shards are merged from the files. Returns the directory written."""
    from transformers import AutoConfig

    from launcher.config.run import parse_run_config
    from launcher.errors import CheckpointError
    from launcher.models.build import apply_lora, build_model, build_model_config, unwrap_peft
    from launcher.models.tokenizers import load_tokenizer
    from launcher.train.checkpoint import CheckpointManager, tag_for
    from launcher.train.model_card import model_card
    from launcher.train.tasks import first_image_size, image_processor_for

    run_dir = Path(run_dir)
    checkpoints = CheckpointManager(run_dir, keep_last=1)
    steps = checkpoints.complete_steps()
    if not steps:
        raise CheckpointError(f"{run_dir}: no checkpoints in {checkpoints.root}")
    if step is None:
        found = checkpoints.newest_valid()
        if found is None:
            raise CheckpointError(f"{run_dir}: no intact checkpoint among steps {steps}")
        step = found[0]
    elif step not in steps:
        raise CheckpointError(f"--step {step}: no checkpoint of that step in {checkpoints.root} (have {steps})")
    elif (problem := checkpoints.verify(step)) is not None:
        raise CheckpointError(f"--step {step}: checkpoint {checkpoints.root / tag_for(step)} is unusable ({problem})")
    manifest = checkpoints.manifest(step)
    if not isinstance(manifest.get("config"), dict):
        raise CheckpointError(
            f"{checkpoints.root / tag_for(step) / 'manifest.json'}: no run config recorded (not written by crate)"
        )
    config = parse_run_config(manifest["config"], source=str(checkpoints.root / tag_for(step) / "manifest.json"))
    target = Path(out) if out is not None else run_dir / ("hf" if step == steps[-1] else f"hf-step{step}")
    targets = [target, adapter_dir_for(target)] if config.lora is not None and config.lora.save_adapter else [target]
    for directory in targets:  # before the (slow) model is built
        if (problem := export_target_problem(directory)) is not None:
            where = "--out" if out is not None else str(run_dir)
            raise InputError(f"{where}: {problem}; choose another directory")
    if config.is_image:
        processor = image_processor_for(config.data, first_image_size(config.data))
    else:
        processor = load_tokenizer(config.tokenizer, output_dir=run_dir)
        if config.task == "sequence-classification" and processor.pad_token is None:
            processor.pad_token = processor.eos_token  # as the run set it
    if "model_config" in manifest:  # the exact model the run trained (any task, init_from or not)
        saved = dict(manifest["model_config"])
        model_config = AutoConfig.for_model(saved.pop("model_type"), **saved)
    else:  # checkpoints written before the manifest recorded it: language models only
        model_config = build_model_config(config.model, len(processor), processor.eos_token_id, config.data.seq_len)
    model = build_model(model_config, config.task)
    if config.lora is not None:  # the checkpoint holds the PEFT model: base weights and adapters
        model = apply_lora(model, config.lora, config.task, config.model.init_from)
    state = consolidated_state_dict(
        checkpoints.root / tag_for(step), manifest.get("zero_stage", config.zero.stage), trust_pickles
    )
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = tuple(getattr(model, "_tied_weights_keys", None) or ())  # a PEFT wrapper's keys end with its model's
    if unexpected or [key for key in missing if not any(key == t or key.endswith("." + t) for t in tied)]:
        raise CheckpointError(
            f"{run_dir}: checkpoint of step {step} does not match the run's model "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    unwrap_peft(model).tie_weights()
    export_hf(
        model,
        processor,
        target,
        is_main=True,
        save_adapter=config.lora is not None and config.lora.save_adapter,
        card=lambda hf_model: model_card(config, hf_model, step, run_dir),
    )
    return target
