"""The pretraining loop (one process per rank), nanoGPT-style: read it top to bottom.

Components with small interfaces do the side jobs: ``launcher.config`` (the validated run config),
``launcher.models`` (model + decay groups), ``launcher.engine`` (DeepSpeed JSON, LR schedule),
``data_pipeline`` (the packed stream and its cursor), ``launcher.checkpoint`` (atomic, verified checkpoints),
``launcher.metrics`` (metrics.jsonl, TensorBoard, progress, MFU), ``launcher.export`` (the HF checkpoint).
"""

from __future__ import annotations

import math
import os
import random
import signal
import time
from functools import partial

import numpy as np
import torch
import torch.distributed as dist

from data_pipeline.spec import SourceSpec
from data_pipeline.text_stream import LogicalStream, TextLoader, Tokenize, build_plan

from .checkpoint import CheckpointManager, tag_for
from .config import RunConfig
from .engine import deepspeed_config, learning_rate, resolve_precision
from .export import export_hf
from .flops import training_flops_per_token
from .metrics import MetricsLogger, ThroughputMeter, device_peak_flops, memory_stats
from .models import build_model, build_model_config, parameter_groups
from .tokenizers import load_tokenizer


class NonFiniteError(RuntimeError):
    """Too many non-finite losses in a row."""


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


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def validation_blocks(config: RunConfig, tokenizer, rank: int, world: int) -> list[torch.Tensor] | None:
    """This rank's share of a fixed set of validation blocks (the built-in sources' held-out split), the same set for
    any world size; ``None`` when a source has no validation split."""
    if not all(source.kind == "builtin" for source in config.data.sources):
        return None
    sources = tuple(SourceSpec(builtin=s.builtin, split="validation", weight=s.weight) for s in config.data.sources)
    spec = config.data.__class__(**{**config.data.__dict__, "sources": sources, "streams_per_rank": 1,
                                    "shuffle_buffer": 0, "min_shards": 1})
    stream = LogicalStream(build_plan(spec, 1), 0, Tokenize(tokenizer))
    total = config.train.eval_batches * config.train.micro_batch_size * world
    blocks = [torch.from_numpy(stream.next_block()[0].astype(np.int64)) for _ in range(total)]
    mine = blocks[rank::world]
    size = config.train.micro_batch_size
    return [torch.stack(mine[i:i + size]) for i in range(0, len(mine), size)]


@torch.no_grad()
def evaluate(engine, batches: list[torch.Tensor], device) -> float:
    engine.eval()
    losses = [engine(input_ids=b.to(device), labels=b.to(device), use_cache=False).loss.float().item()
              for b in batches]
    engine.train()
    return _mean_across_ranks(sum(losses) / len(losses), device)


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

    # -- model, data, engine ------------------------------------------------------------------------------------------
    tokenizer = load_tokenizer(config.tokenizer)
    plan = build_plan(config.data, world)
    model_config = build_model_config(config.model, len(tokenizer), tokenizer.eos_token_id, config.data.seq_len)
    torch.manual_seed(train_cfg.seed)  # identical initial weights on every rank
    model = build_model(model_config)
    if train_cfg.activation_checkpointing:
        model.gradient_checkpointing_enable()
    ds_config = deepspeed_config(config, world, device.type)
    accumulation = ds_config["gradient_accumulation_steps"]
    schedule = partial(learning_rate, optimizer=config.optimizer, max_steps=train_cfg.max_steps)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=parameter_groups(model, config.optimizer.weight_decay), config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: schedule(s) / config.optimizer.lr),
    )
    if train_cfg.compile:
        engine.compile()

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
    loader = TextLoader(plan, tokenizer, rank, train_cfg.micro_batch_size, train_cfg.dataloader_workers,
                        state=data_state)
    batches = iter(loader)
    validation = validation_blocks(config, tokenizer, rank, world) if train_cfg.eval_every else None

    # -- metrics ------------------------------------------------------------------------------------------------------
    precision = resolve_precision(config, device.type)
    peak, peak_source = device_peak_flops(device, torch.bfloat16 if precision == "bf16" else torch.float32)
    tokens_per_step = train_cfg.micro_batch_size * accumulation * world * config.data.seq_len
    flops = training_flops_per_token(model_config, config.data.seq_len,
                                     train_cfg.micro_batch_size * config.data.seq_len)
    meter = ThroughputMeter(tokens_per_step, flops, peak, world_size=world, total_steps=train_cfg.max_steps)
    logger = MetricsLogger(output_dir, is_main=rank == 0, total_steps=train_cfg.max_steps)
    if step:
        logger.truncate_after(step)
    logger.log(step, event="start", world_size=world, precision=precision, peak_flops=peak, peak_source=peak_source,
               resumed=bool(step), params=sum(p.numel() for p in model.parameters()))

    def save() -> None:
        def write(root, staging_tag):
            engine.save_checkpoint(str(root), tag=staging_tag, client_state={"step": step}, save_latest=False)
            torch.save({"data": loader.state_dict(), "rng": _rng_state()}, root / staging_tag / f"crate_rank{rank}.pt")

        checkpoints.save(step, write, {"world_size": world, "config": config.to_dict()})
        if train_cfg.export_on_save:
            export_hf(engine.module, tokenizer, os.path.join(output_dir, "hf"), is_main=rank == 0,
                      zero_stage=config.zero.stage)

    # -- the loop -----------------------------------------------------------------------------------------------------
    nonfinite_in_a_row = 0
    meter.restart()
    while step < train_cfg.max_steps:
        losses, skipped = [], 0
        for _ in range(accumulation):
            batch = next(batches)
            input_ids = batch["input_ids"].to(device)
            loss = engine(input_ids=input_ids, labels=input_ids, use_cache=False).loss
            if _agree(not math.isfinite(loss.item()), device):
                skipped += 1  # no backward: a non-finite loss must not reach the weights
                continue
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        step += 1
        if skipped == accumulation:
            nonfinite_in_a_row += 1
            logger.log(step, event="nonfinite_loss_skipped", in_a_row=nonfinite_in_a_row)
            if nonfinite_in_a_row >= train_cfg.max_nonfinite_in_a_row:
                raise NonFiniteError(f"step {step}: {nonfinite_in_a_row} steps in a row had a non-finite loss "
                                     f"(train.max_nonfinite_in_a_row); the last checkpoint is intact")
            continue
        nonfinite_in_a_row = 0
        grad_norm = engine.get_global_grad_norm()
        if grad_norm is not None and not math.isfinite(float(grad_norm)):
            raise NonFiniteError(f"step {step}: non-finite gradient norm ({grad_norm}); stopping before it spreads "
                                 f"— the last checkpoint is intact")
        meter.tick()

        if step % train_cfg.log_every == 0 or step == train_cfg.max_steps:
            loss_value = _mean_across_ranks(sum(losses) / len(losses), device)
            logger.log(step, loss=loss_value, lr=scheduler.get_last_lr()[0],
                       grad_norm=float(grad_norm) if grad_norm is not None else None,
                       **meter.stats(step), **memory_stats(device))
        if validation and train_cfg.eval_every and step % train_cfg.eval_every == 0:
            eval_loss = evaluate(engine, validation, device)
            logger.log_eval(step, loss=eval_loss, perplexity=math.exp(min(eval_loss, 50)))
            meter.restart()
        out_of_time = (train_cfg.wall_clock_minutes is not None
                       and time.time() - started > 60 * train_cfg.wall_clock_minutes)
        stopping = _agree(stop.raised or out_of_time, device)
        if stopping or step == train_cfg.max_steps or (train_cfg.save_every and step % train_cfg.save_every == 0):
            save()
            meter.restart()
        if stopping:
            logger.log(step, event="stopped", reason="signal" if stop.raised else "wall_clock_minutes")
            break
    logger.close()
    dist.barrier()
    return 0
