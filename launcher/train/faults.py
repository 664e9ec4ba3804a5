"""Deterministic fault injection, so the numerics guards are tested on real runs rather than mocked.

``CRATE_INJECT_FAULTS="nan_loss@3,nan_grad@5-6,nan_grad@9:1"`` makes, at those optimizer steps (1-based, as logged),
the loss non-finite (``nan_loss``) or only its gradient (``nan_grad``: the loss value stays finite), on every rank
or only on the rank after ``:``. Unset (the normal case), it does nothing.
"""

from __future__ import annotations

import os

import torch

from launcher.errors import ConfigError

ENV = "CRATE_INJECT_FAULTS"
KINDS = ("nan_loss", "nan_grad")


class _PoisonGradient(torch.autograd.Function):
    """Identity forward; backward returns NaN, as an overflow deep in the backward pass would."""

    @staticmethod
    def forward(ctx, value):
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def _parse(text: str) -> list[tuple[str, int, int, int | None]]:
    faults = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            kind, _, where = item.partition("@")
            steps, _, rank = where.partition(":")
            first, _, last = steps.partition("-")
            fault = (kind, int(first), int(last or first), int(rank) if rank else None)
        except ValueError:
            raise ConfigError(f"{ENV}: cannot read {item!r} (expected KIND@STEP[-STEP][:RANK])") from None
        if kind not in KINDS:
            raise ConfigError(f"{ENV}: unknown fault {kind!r} in {item!r} (known: {', '.join(KINDS)})")
        faults.append(fault)
    return faults


class FaultInjector:
    def __init__(self, rank: int, text: str | None = None):
        self.rank = rank
        self.faults = _parse(os.environ.get(ENV, "") if text is None else text)

    def _active(self, kind: str, step: int) -> bool:
        return any(
            k == kind and first <= step <= last and rank in (None, self.rank) for k, first, last, rank in self.faults
        )

    def __call__(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        """The loss of optimizer step ``step`` (1-based), poisoned if a fault is due."""
        if not self.faults:
            return loss
        if self._active("nan_loss", step):
            loss = loss * float("nan")
        if self._active("nan_grad", step):
            loss = _PoisonGradient.apply(loss)
        return loss
