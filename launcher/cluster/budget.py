"""Runs sized by compute: ``train.flops_budget: C`` in a sweep file stands for the ``train.max_steps`` that spends
``C`` training FLOPs, so that an IsoFLOP grid (Chinchilla's approach 2: several sizes at each budget, each trained on
``C / (FLOPs per token)`` tokens) is a sweep like any other:

```yaml
axes:
  size: {s: {model.hidden_size: 96}, m: {model.hidden_size: 128}, l: {model.hidden_size: 192}}
  budget:
    c3e13: {train.flops_budget: 3.0e13}
    c1e14: {train.flops_budget: 1.0e14}
```

The key is resolved when the sweep is expanded, never by the training loop: the run config a run gets is an ordinary
one, with ``train.max_steps = round(C / (FLOPs per token x tokens per step))``. FLOPs per token are the architecture
registry's formula (``launcher.architectures``, 6N plus attention and the LM head, as MFU and ``crate compare``
count them) at the run's sequence length. Tokens per step need ``train.global_batch_size``: the number of processes
is not known when a sweep is expanded. The vocabulary is the tokenizer's (``bpe:N``: N, its upper bound, since the
tokenizer is trained only when the run starts; the difference is a fraction of a per cent of the FLOPs and
``crate compare`` reports each run's own count).
"""

from __future__ import annotations

import contextlib

import yaml

from launcher.config.run import BPE_PATTERN, RunConfig, load_run_config
from launcher.errors import ConfigError

FLOPS_BUDGET_KEY = "train.flops_budget"


def _vocabulary_size(config: RunConfig) -> int:
    match = BPE_PATTERN.match(config.tokenizer)
    if match:
        return int(match.group(1))
    from launcher.models.tokenizers import load_tokenizer

    return len(load_tokenizer(config.tokenizer))


def steps_for_flops_budget(config: RunConfig, budget: float) -> int:
    """The number of optimiser steps whose training FLOPs come closest to ``budget`` (at least 1)."""
    from launcher.architectures.registry import training_flops_per_token
    from launcher.models.build import build_model_config

    if config.task != "causal-lm":
        raise ConfigError(f"{FLOPS_BUDGET_KEY}: language-model pretraining runs only (this run is {config.task})")
    if config.train.global_batch_size is None:
        raise ConfigError(f"{FLOPS_BUDGET_KEY}: needs train.global_batch_size (tokens per step must be known)")
    seq_len = config.data.seq_len
    model_config = build_model_config(config.model, _vocabulary_size(config), 0, seq_len)
    per_token = training_flops_per_token(model_config, seq_len, config.train.micro_batch_size * seq_len)
    if per_token is None:  # no formula (Llama, say): counted as the loop counts it, on shapes alone
        per_token = counted_flops_per_token(model_config, seq_len)
    return max(1, round(budget / (per_token * config.train.global_batch_size * seq_len)))


def counted_flops_per_token(model_config, seq_len: int) -> float:
    """Training FLOPs per token of a forward and backward pass of a causal LM over one sequence, counted by torch's
    FlopCounterMode as the loop counts its first step (the count per token does not depend on the batch size)."""
    import torch

    from launcher.architectures.flops import count_flops
    from launcher.models.build import build_model

    model = build_model(model_config, "causal-lm")
    ids = torch.zeros(1, seq_len, dtype=torch.long)
    _, flops = count_flops(lambda: model(input_ids=ids, labels=ids, use_cache=False).loss.backward())
    return flops / seq_len


def resolve_flops_budget(config_path: str, overrides: tuple[str, ...]) -> tuple[str, ...]:
    """``overrides`` with ``train.flops_budget=C`` replaced by the ``train.max_steps`` it stands for (placed before
    the last item, ``output_dir``); unchanged without it. One-line errors name the key."""
    budgets = [item for item in overrides if item.split("=", 1)[0] == FLOPS_BUDGET_KEY]
    if not budgets:
        return overrides
    rest = tuple(item for item in overrides if item.split("=", 1)[0] != FLOPS_BUDGET_KEY)
    if any(item.split("=", 1)[0] == "train.max_steps" for item in rest):
        raise ConfigError("set train.flops_budget or train.max_steps, not both")
    value = yaml.safe_load(budgets[-1].split("=", 1)[1])
    if isinstance(value, str):  # PyYAML reads 3e13 (no dot) as a string
        with contextlib.suppress(ValueError):
            value = float(value)
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError(f"{FLOPS_BUDGET_KEY}: expected a positive number of FLOPs, got {value!r}")
    # max_steps is required and checked against warm-up: a placeholder of 1 step would fail validation on its own
    config = load_run_config(config_path, [*rest, "train.max_steps=1000000000"])
    steps = steps_for_flops_budget(config, float(value))
    return (*rest[:-1], f"train.max_steps={steps}", rest[-1])
