"""The pretraining loop (one process per rank), nanoGPT-style: read it top to bottom.

Components with small interfaces do the side jobs: ``launcher.config.run`` (the validated run config),
``launcher.train.tasks`` (language modelling or image classification: model config, batches, loss, evaluation),
``launcher.models.build`` (model + decay groups), ``launcher.train.engine`` (DeepSpeed JSON, LR schedule),
``data_pipeline`` (the streams and their cursors), ``launcher.train.checkpoint`` (atomic, verified checkpoints),
``launcher.metrics.logger`` (metrics.jsonl, TensorBoard, progress, MFU), ``launcher.train.export`` (the HF checkpoint).
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import socket
import time

import numpy as np
import torch
import torch.distributed as dist

from crate_lm.whitebox import measure

from launcher.train.checkpoint import CheckpointManager, tag_for
from launcher.config.run import RunConfig
from launcher.errors import NonFiniteError
from launcher.train.engine import deepspeed_config, learning_rate, resolve_precision
from launcher.train.export import export_hf
from launcher.train.faults import FaultInjector
from launcher.metrics.figures import save_attention_figure
from launcher.models.flops import frozen_flops_fraction
from launcher.metrics.logger import MetricsLogger, ThroughputMeter, device_peak_flops, memory_stats, model_state_bytes
from launcher.models.build import apply_lora, build_model, freeze_backbone, load_pretrained_weights, parameter_groups, unwrap_peft
from launcher.train.tasks import build_task


STOP_FILE = "STOP"  # <output_dir>/STOP asks a run to save and stop, like SIGUSR1 (works through any launcher)


class StopSignal:
    """SIGTERM / SIGUSR1 set a flag; the loop stops at a step all ranks agree on (the handler does nothing else)."""

    def __init__(self):
        self.raised = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.raised = True


def _agree(flag: bool, device) -> bool:
    """True on every rank if it is true on any rank."""
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _mean_across_ranks(value: float, device) -> float:
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.item() / dist.get_world_size()


def _max_across_ranks(value: float, device) -> float:
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.item()


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def evaluate(engine, task, device) -> dict:
    engine.eval()
    try:
        return task.evaluate(engine, device)
    finally:
        engine.train()


@contextlib.contextmanager
def optimizer_update_withheld(optimizer):
    """Inside, ``optimizer.step()`` does nothing: the engine still clears the gradients and counts the step."""
    patched = vars(optimizer).get("step")  # an LR scheduler may have wrapped it on the instance
    optimizer.step = lambda *args, **kwargs: None
    try:
        yield
    finally:
        if patched is None:
            del optimizer.step  # the class's step again
        else:
            optimizer.step = patched


def full_gradient_norm(model) -> float | None:
    """The 2-norm of the full gradients (ZeRO-0: every rank holds them, already all-reduced), before clipping."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads).item() if grads else None


def train(config: RunConfig) -> int:
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    deepspeed.init_distributed(dist_backend="gloo" if accelerator.device_name() == "cpu" else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(accelerator.device_name(), int(os.environ.get("LOCAL_RANK", 0))
                          if accelerator.device_name() != "cpu" else None)
    if device.type != "cpu":
        accelerator.set_device(device.index)
    stop = StopSignal()
    started = time.time()
    train_cfg, output_dir = config.train, config.output_dir

    # -- task (data, loss, evaluation), model, engine -----------------------------------------------------------------
    task = build_task(config, rank, world, barrier=dist.barrier)
    model_config = task.model_config
    torch.manual_seed(train_cfg.seed)  # identical initial weights on every rank
    model = build_model(model_config, task.kind)
    head = load_pretrained_weights(model, config.model.init_from) if config.model.init_from else None
    trainable = freeze_backbone(model) if config.model.linear_probe else None
    parameter_count = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them
    if train_cfg.activation_checkpointing:
        model.gradient_checkpointing_enable()
    if config.lora is not None:  # frozen pretrained weights, trainable adapters (and classifier head)
        if train_cfg.activation_checkpointing:
            model.enable_input_require_grads()  # checkpointed layers need an input that requires grad
        model = apply_lora(model, config.lora, task.kind, config.model.init_from)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ds_config = deepspeed_config(config, world, device.type)
    accumulation = ds_config["gradient_accumulation_steps"]
    # The schedule follows the loop's step count (skipped steps included), so it ends at max_steps on every stage.
    next_step = [0]

    def lr_factor(_: int) -> float:
        return learning_rate(next_step[0], config.optimizer, train_cfg.max_steps) / config.optimizer.lr

    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=parameter_groups(model, config.optimizer.weight_decay), config=ds_config,
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor),
    )
    if train_cfg.compile:
        engine.compile()
    inject_faults = FaultInjector(rank)

    # -- resume from the newest valid checkpoint ----------------------------------------------------------------------
    checkpoints = CheckpointManager(output_dir, train_cfg.keep_last, rank, barrier=dist.barrier)
    found = [checkpoints.newest_valid() if rank == 0 else None]
    dist.broadcast_object_list(found, src=0)
    step, data_state = 0, None
    if found[0] is not None:
        step = found[0][0]
        engine.load_checkpoint(str(checkpoints.root), tag=tag_for(step))
        own = torch.load(checkpoints.root / tag_for(step) / f"crate_rank{rank}.pt", weights_only=False)
        data_state = own["data"]
        _set_rng_state(own["rng"])
    loader = task.loader(state=data_state)
    batches = iter(loader)
    validation, probe = task.validation, task.probe  # fixed held-out samples

    # -- metrics ------------------------------------------------------------------------------------------------------
    precision = resolve_precision(config, device.type)
    peak, peak_source = device_peak_flops(device, torch.bfloat16 if precision == "bf16" else torch.float32)
    samples_per_step = train_cfg.micro_batch_size * accumulation * world
    tokens_per_step = samples_per_step * task.tokens_per_sample
    flops_per_token = task.flops_per_token * frozen_flops_fraction(config)
    meter = ThroughputMeter(tokens_per_step, flops_per_token, peak, world_size=world,
                            total_steps=train_cfg.max_steps,
                            samples_per_step=samples_per_step if task.unit == "images" else None)
    logger = MetricsLogger(output_dir, is_main=rank == 0, total_steps=train_cfg.max_steps)
    if step:
        logger.truncate_after(step)
    logger.log(step, event="start", task=task.kind, model_type=model_config.model_type, world_size=world,
               precision=precision, peak_flops=peak, peak_source=peak_source, resumed=bool(step),
               params=parameter_count, trainable_params=trainable, init_from=config.model.init_from, head=head,
               gradient_accumulation_steps=accumulation, tokens_per_step=tokens_per_step,
               samples_per_step=samples_per_step, host=socket.gethostname(),
               slurm_node=os.environ.get("SLURMD_NODENAME"), torch_threads=torch.get_num_threads())
    if train_cfg.eval_every and validation is None:
        logger.log(step, event="warning", message="no validation: the sources have no held-out split; "
                                                  "set eval_data")

    def save() -> None:
        def write(root, staging_tag):
            engine.save_checkpoint(str(root), tag=staging_tag, client_state={"step": step}, save_latest=False)
            torch.save({"data": loader.state_dict(), "rng": _rng_state()}, root / staging_tag / f"crate_rank{rank}.pt")

        checkpoints.save(step, write, {"world_size": world, "zero_stage": config.zero.stage,
                                       "config": config.to_dict(), "model_config": model_config.to_dict()})
        if train_cfg.export_on_save:
            export_hf(engine.module, task.processor, os.path.join(output_dir, "hf"), is_main=rank == 0,
                      zero_stage=config.zero.stage, save_adapter=config.lora is not None and config.lora.save_adapter)

    # -- the loop -----------------------------------------------------------------------------------------------------
    skipped_in_a_row, skipped_total, start_step = 0, 0, step
    meter.restart()
    while step < train_cfg.max_steps:
        # A non-finite loss on any rank poisons the step's gradients (loss x NaN), so the one check below skips it
        # while DeepSpeed's micro-step bookkeeping stays intact.
        losses, loss_is_finite = [], True
        for micro in range(accumulation):
            loss = inject_faults(task.loss(engine, next(batches), device, step + 1, micro), step + 1)
            finite = not _agree(not math.isfinite(loss.item()), device)
            loss_is_finite &= finite
            engine.backward(loss if finite else loss * float("nan"))
            # ZeRO 1-3 skip a step whose gradient norm is non-finite themselves; without ZeRO we hold the update back.
            skipped_by_us = False
            if micro == accumulation - 1 and config.zero.stage == 0:
                grad_norm = full_gradient_norm(engine.module)
                skipped_by_us = grad_norm is not None and not math.isfinite(grad_norm)
            next_step[0] = step + 1
            # Model-state memory at its peak: the second step's gradients are reduced, the first step's optimizer
            # states exist.
            state_bytes = model_state_bytes(engine) if step == start_step + 1 and micro == accumulation - 1 else None
            with optimizer_update_withheld(engine.optimizer) if skipped_by_us else contextlib.nullcontext():
                engine.step()
            losses.append(loss.item())
        step += 1
        if config.zero.stage:
            grad_norm = engine.get_global_grad_norm()
        applied = engine.was_step_applied() and not skipped_by_us
        if not applied:
            skipped_in_a_row, skipped_total = skipped_in_a_row + 1, skipped_total + 1
            reason = "loss" if not loss_is_finite else "gradient"
            logger.log(step, event="nonfinite_step_skipped", reason=reason, in_a_row=skipped_in_a_row,
                       skipped_total=skipped_total)
            if skipped_in_a_row >= train_cfg.max_nonfinite_in_a_row:
                raise NonFiniteError(f"step {step}: {skipped_in_a_row} steps in a row skipped for a non-finite "
                                     f"{reason} (train.max_nonfinite_in_a_row); the last checkpoint is intact")
        else:
            skipped_in_a_row = 0
        meter.tick()
        if state_bytes is not None:
            logger.log(step, event="model_state", model_state_gib=state_bytes / 2**30,
                       max_model_state_gib=_max_across_ranks(state_bytes, device) / 2**30)
            state_bytes = None

        if applied and (step % train_cfg.log_every == 0 or step == train_cfg.max_steps):
            loss_value = _mean_across_ranks(sum(losses) / len(losses), device)
            logger.log(step, loss=loss_value, lr=scheduler.get_last_lr()[0],
                       grad_norm=float(grad_norm) if grad_norm is not None else None, skipped_steps=skipped_total,
                       **meter.stats(step), **memory_stats(device))
        if validation and (step % train_cfg.eval_every == 0 or step == train_cfg.max_steps):
            logger.log_eval(step, **evaluate(engine, task, device))
            meter.restart()
        if probe is not None and step % train_cfg.whitebox_every == 0:
            logger.log_whitebox(step, measure(unwrap_peft(engine.module), probe))  # every rank: ZeRO-3 gathers collectively
            if task.unit == "images":  # every rank runs the forward pass (ZeRO-3); rank 0 draws
                save_attention_figure(unwrap_peft(engine.module), probe[:8], os.path.join(output_dir, "whitebox",
                                      f"attention-step{step:06d}.png"), is_main=rank == 0,
                                      mean=task.config.data.mean, std=task.config.data.std)
            meter.restart()
        out_of_time = (train_cfg.wall_clock_minutes is not None
                       and time.time() - started > 60 * train_cfg.wall_clock_minutes)
        stop_file = os.path.join(output_dir, STOP_FILE)  # shared filesystem: Slurm's batch script touches it
        asked = rank == 0 and os.path.exists(stop_file)
        stopping = _agree(stop.raised or out_of_time or asked, device)
        if stopping or step == train_cfg.max_steps or (train_cfg.save_every and step % train_cfg.save_every == 0):
            save()
            meter.restart()
        if stopping:
            reason = "signal" if stop.raised else "wall_clock_minutes" if out_of_time else "stop_file"
            logger.log(step, event="stopped", reason=reason)
            if rank == 0 and os.path.exists(stop_file):
                os.remove(stop_file)  # consumed: the next start trains on
            break
    logger.close()
    dist.barrier()
    return 0
