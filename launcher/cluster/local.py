"""``crate pretrain``: validate everything once, then run the loop in 1..N local processes, or as one rank of a job
started by torchrun, the deepspeed launcher or srun (their usual environment variables)."""

from __future__ import annotations

import errno
import os
import sys
import tempfile
from pathlib import Path

from launcher.cluster.processes import end_with_the_launcher, free_port, spawn_local
from launcher.config.run import RunConfig, load_run_config, save_run_config
from launcher.errors import ConfigError


def _under_a_launcher() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def check_output_dir(config: RunConfig) -> None:
    """``output_dir`` is a writable directory (or can be created), and the directories the run replaces, ``hf/``
    (and a LoRA run's ``adapter/``), are missing, empty or earlier exports; one-line ``ConfigError`` naming the path
    otherwise."""
    from launcher.train.export import adapter_dir_for, export_target_problem

    root = Path(config.output_dir)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"output_dir: {root} is a file")
    check_writable(root)
    hf = root / "hf"
    replaced = [hf] if config.train.exports else []
    if replaced and config.lora is not None and config.lora.save_adapter:
        replaced.append(adapter_dir_for(hf))
    for directory in replaced:
        if (problem := export_target_problem(directory)) is not None:
            raise ConfigError(f"output_dir: {problem}; move it away or choose another output_dir")


# What a directory the user gave can fail a write with: a read-only filesystem, no permission, no space or quota.
_UNWRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT)


def check_writable(root: Path) -> None:
    """``output_dir`` (or, while it does not exist yet, the directory it will be created in) takes a new file: a
    temporary file is created and removed there. One-line ``ConfigError`` naming the path otherwise, before any
    process group exists (as root, permissions do not stop writes; a read-only mount does, so try, not ``access``)."""
    probed = root
    while not probed.exists():  # the nearest existing ancestor is where mkdir will write
        probed = probed.parent
    if not probed.is_dir():
        raise ConfigError(f"output_dir: {root} cannot be created: {probed} is a file")
    try:
        with tempfile.TemporaryFile(dir=probed, prefix=".crate-write-test-"):
            pass
    except OSError as error:
        if error.errno not in _UNWRITABLE:
            raise
        where = root if probed == root else f"{root} (in {probed})"
        raise ConfigError(f"output_dir: {where} is not writable: {os.strerror(error.errno)}") from None


def preflight(config: RunConfig, world_size: int) -> None:
    """Every check that can fail before a process group exists: batch sizes, tokenizer, data (built-in corpora are
    prepared here, once), model, and that a checkpoint to resume from can be resumed on this world size."""
    from data_pipeline.text_stream import build_plan
    from launcher.models.build import build_model_config, build_vision_config
    from launcher.models.tokenizers import load_tokenizer, prepare_tokenizer
    from launcher.train.elastic import check_resume
    from launcher.train.tasks import class_names, evaluated_samples

    config.check_world(world_size)
    evaluated_samples(config.train, world_size)
    check_resume(config, world_size)
    if config.is_image:
        from data_pipeline.image_stream import build_image_plan

        plan = build_image_plan(config.data, world_size)
        model_config = build_vision_config(
            config.model, config.data.image_size, config.data.channels, class_names(plan)
        )
    elif config.task == "sequence-classification":  # small data: read it all once, as the ranks will
        from launcher.train.tasks import SequenceClassificationTask

        model_config = SequenceClassificationTask(
            config.model_copy(update={"train": config.train.model_copy(update={"eval_every": 0, "whitebox_every": 0})}),
            0,
            world_size,
        ).model_config
    else:
        prepare_tokenizer(config.tokenizer, config.output_dir, config.data)
        tokenizer = load_tokenizer(config.tokenizer, output_dir=config.output_dir)
        build_plan(config.data, world_size)
        model_config = build_model_config(config.model, len(tokenizer), tokenizer.eos_token_id, config.data.seq_len)
    if config.lora is not None:  # the adapters' targets exist: checked on weightless (meta) tensors
        import torch

        from launcher.models.build import apply_lora, build_model

        with torch.device("meta"):
            apply_lora(build_model(model_config, config.task), config.lora, config.task, config.model.init_from)


def pretrain(config_path: str, overrides: list[str], nproc_per_node: int = 1, command: str = "pretrain") -> int:
    """``crate pretrain`` / ``crate finetune`` (the same loop; fine-tuning starts from ``model.init_from``)."""
    if nproc_per_node < 1:
        raise ConfigError(f"--nproc-per-node: must be >= 1 (got {nproc_per_node})")
    if _under_a_launcher():
        end_with_the_launcher()  # a rank of spawn_local: before anything slow
    config = load_run_config(config_path, overrides)
    if command == "finetune" and not config.model.init_from:
        raise ConfigError(
            f"{config_path}: model.init_from: required by crate finetune (the HF checkpoint to start from)"
        )
    check_output_dir(config)
    if _under_a_launcher():
        from launcher.train.loop import train

        return train(config)
    preflight(config, nproc_per_node)
    save_run_config(config, Path(config.output_dir) / "config.yaml")
    if nproc_per_node == 1:
        os.environ.update(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
        )
        from launcher.train.loop import train

        return train(config)
    return spawn_local([sys.executable, "-m", "launcher.cli", command, config_path, *overrides], nproc_per_node)
