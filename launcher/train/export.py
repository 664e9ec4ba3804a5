"""HF export: ``<output_dir>/hf/`` holds safetensors, config, generation config, the preprocessor (the tokenizer, or
for image runs the image processor) and, for CRATE, the modeling code (``auto_map``), so
``AutoModelForCausalLM`` / ``AutoModelForImageClassification.from_pretrained(<output_dir>/hf)`` just works. A LoRA
run's export is merged; its adapter folder (PEFT's) goes to ``<output_dir>/adapter/``.

ZeRO-3 partitions the parameters over ranks: every rank enters the gathers, rank 0 writes. The gathers go a group of
modules at a time, none larger than the largest module (see [`zero3_state_dict`]), so an export holds at most one
module's worth of parameters whole on any rank — not the model — while rank 0 builds the full weights in host
memory. The directory is written beside the old one and swapped
in, so a crash mid-export never leaves a half-written ``hf/``.

An export replaces only what is an export: every one holds a small ``crate_export.json``, and a directory is written
only if it is missing, empty or an earlier export (see [`export_target_problem`]); anything else is refused with a
one-line error naming it, so no export deletes files it did not write.
"""

from __future__ import annotations

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


def _partitioned_bytes(parameters) -> int:
    """Bytes of the parameters whole (``ds_numel``: a ZeRO-3 parameter's own ``numel`` is its empty placeholder's; a
    parameter DeepSpeed does not manage is whole already)."""
    return sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in parameters)


def gather_groups(model) -> list[list]:
    """The parameters of a ZeRO-3 ``model`` in the groups [`zero3_state_dict`] gathers, in module order: each module's
    own parameters (not its children's; a tied one at its first module only) are never split, and consecutive modules
    share a group while it holds no more bytes than the largest module's own parameters — so a group is never larger
    than the largest module, and a deep model of small layers takes a few gathers, not one per module."""
    owned, seen = [], set()
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for p in own)
        if own:
            owned.append(own)
    budget = max((_partitioned_bytes(own) for own in owned), default=0)
    groups: list[list] = []
    for own in owned:
        if groups and _partitioned_bytes(groups[-1]) + _partitioned_bytes(own) <= budget:
            groups[-1] = groups[-1] + own
        else:
            groups.append(own)
    return groups


def zero3_state_dict(model, is_main: bool) -> dict | None:
    """The full state dict of a ZeRO-3 partitioned ``model``, on the CPU of rank 0 (``None`` on the other ranks).
    Collective: every rank calls it.

    The parameters are gathered a group at a time ([`gather_groups`]: at most the largest module's bytes), copied to
    rank 0's host memory and released before the next group is gathered, so no rank ever holds more than the largest
    module's parameters whole, where gathering them all at once held the whole model on every rank
    (``GatheredParameters`` re-partitions on leaving; ``modifier_rank=None`` because nothing is written back, which
    saves a broadcast). A tied parameter (the LM head on the embeddings) is gathered once and its keys share the one
    CPU tensor. Buffers are never partitioned and are copied as they are.

    DeepSpeed's own ``_zero3_consolidated_16bit_state_dict`` walks the modules one at a time too, but is a private
    engine method (this takes the bare module), broadcasts every module back after gathering it and gathers once per
    module; its only public caller, ``save_16bit_model``, writes a pickled ``pytorch_model.bin``, not safetensors."""
    import deepspeed
    import torch

    copied: dict[int, torch.Tensor] = {}  # id(parameter) -> its CPU copy (rank 0)
    for group in gather_groups(model):
        with deepspeed.zero.GatheredParameters(group, modifier_rank=None):
            if is_main:  # a copy: on the CPU ``.to("cpu")`` alone would alias the gathered buffer DeepSpeed frees
                copied.update((id(p), p.detach().to("cpu", copy=True)) for p in group)
    if not is_main:
        return None
    parameters = {name: copied[id(p)] for name, p in model.named_parameters(remove_duplicate=False)}
    # The keys are the module's own state_dict's (its persistent buffers included); under ZeRO-3 it is cheap: the
    # parameters in it are the empty placeholders of the partitioned ones.
    return {
        key: parameters[key] if key in parameters else value.detach().to("cpu", copy=True)
        for key, value in model.state_dict().items()
    }


def _detached_copy(model, state: dict):
    """``model``'s copy outside any engine, holding ``state`` (CPU tensors, used as they are: no second copy): the
    same class, config and, for a PEFT model, adapter config, built on the meta device. Merging or saving it leaves
    the training model untouched."""
    import copy

    import torch

    peft = hasattr(model, "peft_config")
    base = model.get_base_model() if peft else model
    with torch.device("meta"):
        fresh = type(base)(base.config)
        fresh.name_or_path = base.name_or_path
        if peft:
            from peft import get_peft_model

            fresh = get_peft_model(fresh, copy.deepcopy(model.peft_config["default"]))
    if getattr(base, "generation_config", None) is not None:
        fresh_base = fresh.get_base_model() if peft else fresh
        fresh_base.generation_config = copy.deepcopy(base.generation_config)
    fresh.load_state_dict(state, assign=True)
    (fresh.get_base_model() if peft else fresh).tie_weights()  # the state holds tied weights as two keys
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
    ``save_pretrained``) goes to ``adapter_dir_for``. Under ZeRO-3 every rank calls it (the gathers are collective);
    rank 0 writes a detached CPU copy built from [`zero3_state_dict`]."""
    out = Path(out_dir)
    if zero_stage == 3:
        state = zero3_state_dict(model, is_main)
        if not is_main:
            return
        model = _detached_copy(model, state)
    elif not is_main:
        return
    if hasattr(model, "peft_config"):
        adapted = model if zero_stage == 3 else _detached_copy(model, _cpu_state(model))
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


def _cpu_state(model) -> dict:
    """A whole (unpartitioned) model's state dict, copied to the CPU."""
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in model.state_dict().items()}


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
