"""The DeepSpeed side of a run: its JSON config generated from the run config, precision, the LR schedule, and the
engine itself."""

from __future__ import annotations

import json
import math
from pathlib import Path

from launcher.config.files import deep_merge
from launcher.config.run import OptimizerSection, RunConfig
from launcher.errors import ConfigError

NEVER = 10**9  # DeepSpeed's own step printing: off (our metrics component reports)


def resolve_precision(config: RunConfig, device_type: str) -> str:
    """``auto`` is bf16 on an accelerator, fp32 on the CPU."""
    if config.precision != "auto":
        return config.precision
    return "fp32" if device_type == "cpu" else "bf16"


def deepspeed_config(config: RunConfig, world_size: int, device_type: str, load_universal: bool = False) -> dict:
    """DeepSpeed's JSON for this run; ``deepspeed_config`` (a user JSON file) overrides any key of it.
    ``load_universal``: the engine loads a universal checkpoint (a resume on another world size,
    ``launcher.train.elastic``)."""
    accumulation = config.check_world(world_size)
    optimizer = config.optimizer
    zero: dict = {"stage": config.zero.stage}
    if config.zero.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if config.zero.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    adamw = {
        "lr": optimizer.lr,
        "betas": list(optimizer.betas),
        "eps": optimizer.eps,
        "weight_decay": optimizer.weight_decay,
    }
    if device_type == "cpu":
        # DeepSpeed's CPU FusedAdam keeps beta^t as a running float product across steps but recomputes it with pow()
        # after a resume, so a resumed run drifts from an uninterrupted one by a few ulps; torch's AdamW derives it
        # from the step count every time, which keeps resume bit-exact. (The CUDA FusedAdam uses pow() every step.)
        adamw["torch_adam"] = True
    generated = {
        "train_micro_batch_size_per_gpu": config.train.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": config.train.micro_batch_size * accumulation * world_size,
        "gradient_clipping": optimizer.grad_clip,
        "optimizer": {"type": "AdamW", "params": adamw},
        "zero_optimization": zero,
        # check_grad_overflow: a step with a non-finite gradient norm is skipped, not applied (fp32 ZeRO does so too)
        "bf16": {"enabled": resolve_precision(config, device_type) == "bf16", "check_grad_overflow": True},
        "steps_per_print": NEVER,
        "wall_clock_breakdown": False,
    }
    if load_universal:
        generated["checkpoint"] = {"load_universal": True}
    if config.deepspeed_config:
        path = Path(config.deepspeed_config)
        try:
            user = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"deepspeed_config: {path} does not exist") from None
        except ValueError as error:
            raise ConfigError(f"deepspeed_config: {path} is not valid JSON ({error})") from None
        if not isinstance(user, dict):
            raise ConfigError(f"deepspeed_config: {path} must hold a JSON object")
        generated = deep_merge(generated, user)
    return generated


def learning_rate(step: int, optimizer: OptimizerSection, max_steps: int) -> float:
    """Linear warm-up to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr`` at ``max_steps``."""
    if step < optimizer.warmup_steps:
        return optimizer.lr * (step + 1) / optimizer.warmup_steps
    progress = min(1.0, (step - optimizer.warmup_steps) / max(1, max_steps - optimizer.warmup_steps))
    return optimizer.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (optimizer.lr - optimizer.min_lr)


def initialize_engine(model, config: RunConfig, world_size: int, device_type: str, load_universal: bool = False):
    """``deepspeed.initialize`` on ``model`` with the run's JSON and AdamW over the model's decay groups.

    Without ZeRO the optimizer is the loop's own [`HoldableAdamW`] (torch's AdamW), because only
    ZeRO 1-3 skip a non-finite step by themselves; with ZeRO, DeepSpeed builds AdamW from the JSON. The learning
    rate is set by the loop before every update (``learning_rate``), so no scheduler state needs saving."""
    import deepspeed

    from launcher.models.build import parameter_groups
    from launcher.train.step import HoldableAdamW

    ds_config = deepspeed_config(config, world_size, device_type, load_universal)
    groups = parameter_groups(model, config.optimizer.weight_decay)
    optimizer = None
    if config.zero.stage == 0:
        settings = ds_config.pop("optimizer")
        if settings.get("type") != "AdamW":
            raise ConfigError(
                f"deepspeed_config: optimizer.type {settings.get('type')!r}: without ZeRO the run uses "
                "its own AdamW (it holds back non-finite steps); choose another optimizer with "
                "zero.stage >= 1"
            )
        params = {key: value for key, value in settings["params"].items() if key != "torch_adam"}
        params["betas"] = tuple(params["betas"])
        optimizer = HoldableAdamW(groups, **params)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=None if optimizer else groups, optimizer=optimizer, config=ds_config
    )
    return engine, ds_config["gradient_accumulation_steps"]
