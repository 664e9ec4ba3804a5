"""One optimizer step: the micro-batches' forward and backward passes, the non-finite guard, and the update.

A non-finite loss on any rank poisons the step's gradients (``loss x NaN``), so that one check — the gradient norm
— decides for every rank and every ZeRO stage whether the update is applied, while DeepSpeed's micro-step
bookkeeping stays intact. ZeRO 1-3 (and bf16) skip a step whose gradient norm is non-finite themselves; without ZeRO
the loop's own optimizer ([`HoldableAdamW`]) holds the update back.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from launcher.errors import OutOfMemoryError

DEVICE_OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


@dataclass(frozen=True)
class StepOutcome:
    """What one optimizer step did, for the side jobs. ``loss``: this rank's mean micro-batch loss."""

    loss: float
    applied: bool
    nonfinite: str | None  # "loss" or "gradient" when the update was skipped
    grad_norm: float | None


class HoldableAdamW(torch.optim.AdamW):
    """torch's AdamW whose update can be held back: inside ``held()`` its ``step()`` changes no weight, moment or
    step count, while the engine still clears the gradients and counts the micro-steps — a skipped step, as ZeRO
    skips one. The hold ends with the block, so a wrapper that skipped the step itself (bf16's overflow check)
    leaves nothing pending for the next step."""

    _held = False

    @contextlib.contextmanager
    def held(self):
        self._held = True
        try:
            yield
        finally:
            self._held = False

    def step(self, closure=None):
        if self._held:
            return None
        return super().step(closure)


@contextlib.contextmanager
def memory_knobs_on_oom(what: str):
    """An accelerator out-of-memory error inside becomes the project's ``OutOfMemoryError``: one line that names
    what ran out (``what``) and the config knobs that lower the footprint (the original stays chained)."""
    try:
        yield
    except DEVICE_OUT_OF_MEMORY as error:
        raise OutOfMemoryError.during(what, error) from error


def any_rank(flag: bool, device) -> bool:
    """True on every rank if it is true on any rank (one all-reduce)."""
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def sum_across_ranks(values: list[float], device) -> list[float]:
    """The element-wise sums of ``values`` over the ranks (one all-reduce; the values themselves without a process
    group)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


def full_gradient_norm(model) -> float | None:
    """The 2-norm of the full gradients (ZeRO-0: every rank holds them, already all-reduced), before clipping."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads).item() if grads else None


def set_learning_rate(optimizer, lr: float) -> None:
    """The learning rate of the next update, in every parameter group (ZeRO's wrappers share their groups)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def train_step(
    engine,
    micro_losses: Callable[[int], torch.Tensor],
    accumulation: int,
    zero_stage: int,
    device,
    before_update: Callable[[], None] | None = None,
) -> StepOutcome:
    """Run ``accumulation`` micro-steps (``micro_losses(micro)`` returns a micro-batch's loss) and the update.

    ``before_update`` runs after the last backward pass, just before the optimizer step (gradients reduced, the
    optimizer's states there): the moment the model-state memory peaks."""
    losses, loss_is_finite, held = [], True, False
    update = contextlib.nullcontext()
    for micro in range(accumulation):
        loss = micro_losses(micro)
        finite = not any_rank(not math.isfinite(loss.item()), device)
        loss_is_finite &= finite
        engine.backward(loss if finite else loss * float("nan"))
        last = micro == accumulation - 1
        grad_norm = None
        if last and zero_stage == 0:
            grad_norm = full_gradient_norm(engine.module)
            if grad_norm is not None and not math.isfinite(grad_norm):
                update, held = _basic_optimizer(engine.optimizer).held(), True
        if last and before_update is not None:
            before_update()
        with update:
            engine.step()
        losses.append(loss.item())
    if zero_stage:
        grad_norm = engine.get_global_grad_norm()
    applied = engine.was_step_applied() and not held
    return StepOutcome(
        loss=sum(losses) / len(losses),
        applied=applied,
        nonfinite=None if applied else ("loss" if not loss_is_finite else "gradient"),
        grad_norm=float(grad_norm) if grad_norm is not None else None,
    )


def _basic_optimizer(optimizer) -> HoldableAdamW:
    """The [`HoldableAdamW`] under DeepSpeed's wrappers (bf16 wraps it; fp32 without ZeRO uses it directly)."""
    while not isinstance(optimizer, HoldableAdamW):
        inner = getattr(optimizer, "optimizer", None)
        if inner is None:
            raise TypeError(f"ZeRO-0 needs the loop's HoldableAdamW, found {type(optimizer).__name__}")
        optimizer = inner
    return optimizer
