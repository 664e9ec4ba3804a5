"""The training loop (one process per rank), nanoGPT-style: read it top to bottom.

``train`` sets the run up — the task (data, loss, evaluation: ``launcher.train.tasks``), the model
(``launcher.models.build``), the DeepSpeed engine (``launcher.train.engine``), the resume point
(``launcher.train.checkpoint``) and the metrics (``launcher.metrics``) — and then repeats one optimizer step
(``launcher.train.step.train_step``) followed by the side jobs (``launcher.train.side_jobs``: non-finite guard,
model-state probe, training metrics, evaluation, white-box probe, stop requests, checkpoints), whose time stays out
of the throughput. A watchdog (``launcher.train.watchdog``), petted at each of these phases, turns a hung or dead
peer into one line and an exit. On CUDA the run asks SDPA for FlashAttention first (``launcher.train.attention``).
Model code knows nothing of this.
"""

from __future__ import annotations

import os
import socket
import time

import torch
import torch.distributed as dist

from launcher.architectures.flops import count_flops, frozen_flops_fraction
from launcher.architectures.registry import architecture
from launcher.config.run import RunConfig
from launcher.metrics.logger import MetricsLogger
from launcher.metrics.peaks import device_peak_flops
from launcher.metrics.throughput import ThroughputMeter
from launcher.models.build import apply_lora, build_model, freeze_backbone, load_pretrained_weights
from launcher.train.attention import flash_attention_first
from launcher.train.checkpoint import CheckpointManager, tag_for
from launcher.train.elastic import (
    checkpoint_facts,
    data_cursor,
    plan_resume,
    reseed,
    universal_checkpoint,
    universal_load_repaired,
)
from launcher.train.engine import initialize_engine, learning_rate, resolve_precision
from launcher.train.export import export_hf
from launcher.train.faults import FaultInjector
from launcher.train.model_card import model_card
from launcher.train.rank_state import load_rank_state, rng_state, save_rank_state, set_rng_state
from launcher.train.safe_loading import check_checkpoint_pickles, restricted_unpickling
from launcher.train.side_jobs import (
    BatchFingerprints,
    Checkpointing,
    Evaluation,
    ModelStateProbe,
    NonFiniteGuard,
    StopRequests,
    StopSignal,
    TrainMetrics,
    WhiteboxProbe,
)
from launcher.train.step import any_rank, memory_knobs_on_oom, set_learning_rate, synchronize, train_step
from launcher.train.tasks import build_task
from launcher.train.watchdog import Watchdog, process_group_timeout


def _start_distributed(timeout_minutes: float) -> tuple[int, int, torch.device]:
    """The process group (gloo on the CPU, NCCL on GPUs; its collectives time out a margin after the watchdog) and
    this rank's device."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    on_cpu = accelerator.device_name() == "cpu"
    deepspeed.init_distributed(
        dist_backend="gloo" if on_cpu else "nccl", timeout=process_group_timeout(timeout_minutes)
    )
    device = torch.device(accelerator.device_name(), None if on_cpu else int(os.environ.get("LOCAL_RANK", 0)))
    if not on_cpu:
        accelerator.set_device(device.index)
    return dist.get_rank(), dist.get_world_size(), device


def all_ranks(obj) -> list:
    """Every rank's ``obj``, in rank order (one all-gather of picklable objects)."""
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def _build_model(config: RunConfig, task) -> tuple[torch.nn.Module, dict]:
    """The model the run trains (pretrained weights, linear probe, activation checkpointing, LoRA) and the facts
    the start row records about it."""
    torch.manual_seed(config.train.seed)  # identical initial weights on every rank
    model = build_model(task.model_config, task.kind)
    head = load_pretrained_weights(model, config.model.init_from) if config.model.init_from else None
    trainable = freeze_backbone(model) if config.model.linear_probe else None
    params = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them
    if config.train.activation_checkpointing:
        model.gradient_checkpointing_enable()
    if config.lora is not None:  # frozen pretrained weights, trainable adapters (and classifier head)
        if config.train.activation_checkpointing:
            model.enable_input_require_grads()  # checkpointed layers need an input that requires grad
        model = apply_lora(model, config.lora, task.kind, config.model.init_from)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return model, {"params": params, "trainable_params": trainable, "head": head}


def train(config: RunConfig) -> int:
    """Train this rank: the process group, then everything else under the watchdog."""
    # The process group's start is bounded by its own timeout (the rendezvous waits that long for every rank). The
    # watchdog starts after it: before the rendezvous DeepSpeed builds its CPU shared-memory op, the first time on a
    # machine a compile of a minute or more that is no peer's fault.
    rank, world, device = _start_distributed(config.train.collective_timeout_minutes)
    with Watchdog(config.train.collective_timeout_minutes, rank) as watchdog, flash_attention_first(device):
        return _train(config, rank, world, device, watchdog)


def _train(config: RunConfig, rank: int, world: int, device: torch.device, watchdog: Watchdog) -> int:
    stop_signal, started = StopSignal(), time.time()
    train_cfg, output_dir = config.train, config.output_dir

    # -- task (data, loss, evaluation), model, engine -----------------------------------------------------------------
    watchdog.pet("the task's setup", 0)
    task = build_task(config, rank, world, barrier=dist.barrier)
    watchdog.pet("the model's setup", 0)
    model, facts = _build_model(config, task)
    watchdog.pet("the resume", 0)

    # -- the newest valid checkpoint, and how it resumes here (another world size: launcher.train.elastic) -----------
    checkpoints = CheckpointManager(
        output_dir,
        train_cfg.keep_last,
        rank,
        barrier=dist.barrier,
        any_rank=lambda flag: any_rank(flag, device),
        world_size=world,
        gather=all_ranks,
    )
    found = checkpoints.newest_valid()  # every rank checks its share of the checksums
    resume = None
    if found is not None:  # the global batch may come from the checkpoint: before the engine exists
        config, resume = plan_resume(found[1], checkpoints.manifest(found[0]), config, world)
        train_cfg = config.train

    watchdog.pet("the DeepSpeed engine's setup", 0)
    engine, accumulation = initialize_engine(
        model, config, world, device.type, load_universal=resume is not None and resume.universal
    )
    if train_cfg.compile:
        engine.compile()
    inject_faults = FaultInjector(rank)
    samples_per_step = train_cfg.micro_batch_size * accumulation * world

    step, data_state, samples_before = 0, None, 0
    if resume is not None:
        watchdog.pet("the resume", 0)
        step, trusted = resume.step, train_cfg.trust_pickled_checkpoints
        check_checkpoint_pickles(resume.directory, trusted)  # every rank: the same files, the same answer
        load_dir, tag = str(checkpoints.root), tag_for(step)
        if resume.universal:
            watchdog.pet("the universal checkpoint conversion", step)
            load_dir, tag = universal_checkpoint(resume, rank, dist.barrier)
        with restricted_unpickling(trusted), universal_load_repaired(engine.optimizer, resume.universal):
            engine.load_checkpoint(load_dir, tag=tag)
        data_state = data_cursor(resume, rank, trusted)
        if resume.elsewhere:
            reseed(train_cfg.seed, step, rank)
        else:
            set_rng_state(load_rank_state(resume.directory, rank, trusted)["rng"])
        samples_before = resume.samples_seen - step * samples_per_step  # non-zero after a global batch change
    loader = task.loader(state=data_state, device=device)

    # -- metrics ------------------------------------------------------------------------------------------------------
    precision = resolve_precision(config, device.type)
    peak, peak_source = device_peak_flops(device, torch.bfloat16 if precision == "bf16" else torch.float32)
    tokens_per_step = samples_per_step * task.tokens_per_sample
    # An architecture without a FLOP formula is counted on the first step (exact, frozen weights included).
    flops_per_token = task.flops_per_token * frozen_flops_fraction(config) if task.flops_per_token else None
    meter = ThroughputMeter(
        tokens_per_step,
        flops_per_token or 0.0,
        peak,
        world_size=world,
        total_steps=train_cfg.max_steps,
        samples_per_step=samples_per_step if task.unit == "images" else None,
        tokens_before=samples_before * task.tokens_per_sample,
    )
    logger = MetricsLogger(output_dir, is_main=rank == 0, total_steps=train_cfg.max_steps)
    if step:
        logger.truncate_after(step)
    logger.log(
        step,
        event="start",
        task=task.kind,
        model_type=task.model_config.model_type,
        world_size=world,
        precision=precision,
        peak_flops=peak,
        peak_source=peak_source,
        resumed=bool(step),
        resumed_from_world_size=resume.saved_world if resume else None,
        init_from=config.model.init_from,
        gradient_accumulation_steps=accumulation,
        tokens_per_step=tokens_per_step,
        samples_per_step=samples_per_step,
        flops_per_token=flops_per_token,
        host=socket.gethostname(),
        slurm_node=os.environ.get("SLURMD_NODENAME"),
        torch_threads=torch.get_num_threads(),
        **facts,
    )
    if resume is not None and resume.global_batch != resume.saved_global_batch:
        logger.log(
            step,
            event="global_batch_changed",
            previous_global_batch=resume.saved_global_batch,
            global_batch=resume.global_batch,
            samples_seen=resume.samples_seen,
            tokens_seen=resume.samples_seen * task.tokens_per_sample,
        )
        logger.warn(
            step,
            f"the global batch changes from {resume.saved_global_batch} to {resume.global_batch} samples at step "
            f"{step}: the run continues from the {resume.samples_seen} samples consumed; the learning-rate schedule "
            "goes on by step",
        )
    fingerprints = BatchFingerprints(logger, gather=all_ranks) if train_cfg.batch_fingerprints else None
    batches = fingerprints.watch(iter(loader)) if fingerprints else iter(loader)
    if train_cfg.eval_every and task.validation is None:
        logger.warn(step, "no validation: the sources have no held-out split; set eval_data")

    def save(at_step: int) -> None:
        def write(root, staging_tag):
            engine.save_checkpoint(str(root), tag=staging_tag, client_state={"step": at_step}, save_latest=False)
            save_rank_state(root / staging_tag, rank, {"data": loader.state_dict(), "rng": rng_state()})

        samples_seen = samples_before + at_step * samples_per_step
        checkpoints.save(
            at_step,
            write,
            {
                **checkpoint_facts(config, world, accumulation, samples_seen, loader),
                "config": config.to_dict(),
                "model_config": task.model_config.to_dict(),
            },
        )
        if train_cfg.export_due(at_step):
            export_hf(
                engine.module,
                task.processor,
                os.path.join(output_dir, "hf"),
                is_main=rank == 0,
                zero_stage=config.zero.stage,
                save_adapter=config.lora is not None and config.lora.save_adapter,
                card=lambda hf_model: model_card(config, hf_model, at_step, output_dir),
            )

    # -- side jobs, in the order every rank runs them -----------------------------------------------------------------
    last = train_cfg.max_steps
    guard = NonFiniteGuard(logger, train_cfg.max_nonfinite_in_a_row)
    model_state = ModelStateProbe(logger, engine, probe_step=step + 2, device=device)
    stop = StopRequests(
        stop_signal, output_dir, train_cfg.wall_clock_minutes, started, rank, device, train_cfg.stop_check_every
    )
    side_jobs = [
        guard,
        model_state,
        TrainMetrics(
            logger,
            meter,
            guard,
            lambda s: learning_rate(s, config.optimizer, last),
            train_cfg.log_every,
            last,
            device,
            data_stats=loader.stats,
        ),
        Evaluation(logger, engine, task, train_cfg.eval_every, last, device),
        WhiteboxProbe(
            logger,
            engine,
            task,
            architecture(task.model_config.model_type).whitebox,
            train_cfg.whitebox_every,
            output_dir,
            is_main=rank == 0,
        ),
        *([fingerprints] if fingerprints else []),
        stop,
        Checkpointing(save, train_cfg.save_every, last, stop),
    ]

    def micro_losses(micro: int) -> torch.Tensor:
        return inject_faults(task.loss(engine, next(batches), device, step + 1, micro), step + 1)

    def next_step():
        """Optimizer step ``step + 1`` (``step`` counts the steps done)."""
        return train_step(
            engine,
            micro_losses,
            accumulation,
            config.zero.stage,
            device,
            before_update=model_state.before_update(step + 1),
        )

    # -- the loop -----------------------------------------------------------------------------------------------------
    meter.restart()
    while step < train_cfg.max_steps:
        watchdog.pet("the optimizer step", step + 1)
        # The schedule follows the loop's step count (skipped steps included), so it ends at max_steps on every stage.
        set_learning_rate(engine.optimizer, learning_rate(step, config.optimizer, last))
        with memory_knobs_on_oom(f"step {step + 1}"):
            if flops_per_token is None:  # no formula: this first step's forward and backward passes, counted
                outcome, counted = count_flops(next_step)
                flops_per_token = meter.flops_per_token = counted * world / tokens_per_step
                logger.log(step + 1, event="flops_counted", flops_per_token=flops_per_token)
            else:
                outcome = next_step()
        step += 1
        if step % train_cfg.log_every == 0 or step == last:
            synchronize(device)  # the meter's clock reads the device's time at logging steps, and only there
        meter.tick()
        with meter.paused(), memory_knobs_on_oom(f"the side jobs of step {step}"):
            for job in side_jobs:
                watchdog.pet(job.phase, step)
                job.maybe_run(step, outcome)
        if stop.stopping:
            logger.log(step, event="stopped", reason=stop.reason)
            stop.consume()
            break
    logger.close()
    watchdog.pet("the final barrier", step)
    dist.barrier()
    return 0
