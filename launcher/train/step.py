"""One optimizer step: the micro-batches' forward and backward passes, the non-finite guard, and the update.

A non-finite loss poisons that rank's gradients (``loss x NaN``, decided on the device), and the gradient
reduction carries the NaN to every rank, so that one check — the gradient norm — decides for every rank and every
ZeRO stage whether the update is applied, while DeepSpeed's micro-step bookkeeping stays intact. ZeRO 1-3 (and bf16)
skip a step whose gradient norm is non-finite themselves; without ZeRO the loop's own optimizer ([`HoldableAdamW`])
holds the update back.

The hot path (a GPU's): the step adds no collective and no host sync of its own, except ZeRO-0's gradient-norm
check (one per step: DeepSpeed's ZeRO 1-3 make the same one inside their step). The losses stay on the device; the
side jobs read them at logging steps (``StepOutcome.loss`` is a tensor).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from launcher.errors import OutOfMemoryError

DEVICE_OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


@dataclass(frozen=True)
class StepOutcome:
    """What one optimizer step did, for the side jobs. ``loss``: this rank's mean micro-batch loss, a 0-d tensor on
    the device (reading it is a host sync: only at logging steps); ``grad_norm`` likewise a tensor or a float."""

    loss: torch.Tensor
    applied: bool
    nonfinite: str | None  # "loss" or "gradient" when the update was skipped
    grad_norm: torch.Tensor | float | None


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


def sum_across_ranks(values: list, device) -> list[float]:
    """The element-wise sums of ``values`` (numbers or 0-d tensors) over the ranks (one all-reduce and one host read;
    the values themselves without a process group)."""
    tensor = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(()) for v in values])
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


def full_gradient_norm(model) -> torch.Tensor | None:
    """The 2-norm of the full gradients (ZeRO-0: every rank holds them, already all-reduced), before clipping; a
    0-d tensor on the device."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else None


def poisoned_unless_finite(loss: torch.Tensor) -> torch.Tensor:
    """``loss`` itself when finite, else NaN with NaN gradients (``loss x NaN``): decided on the device, no sync.
    (Multiplying by 1.0 changes neither the loss nor its gradients.)"""
    return loss * torch.where(torch.isfinite(loss.detach()), 1.0, float("nan"))


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (nothing to wait for on the CPU)."""
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


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
    loss_sum = torch.zeros((), dtype=torch.float32, device=device)
    loss_is_finite = torch.ones((), dtype=torch.bool, device=device)
    update, held, grad_norm = contextlib.nullcontext(), False, None
    for micro in range(accumulation):
        loss = micro_losses(micro)
        loss_is_finite &= torch.isfinite(loss.detach())
        engine.backward(poisoned_unless_finite(loss))
        last = micro == accumulation - 1
        if last and zero_stage == 0:
            grad_norm = full_gradient_norm(engine.module)
            # The step's one host sync: whether the update is held back (every rank reads the same reduced norm).
            if grad_norm is not None and not bool(torch.isfinite(grad_norm)):
                update, held = _basic_optimizer(engine.optimizer).held(), True
        if last and before_update is not None:
            before_update()
        with update:
            engine.step()
        loss_sum += loss.detach().float()
    if zero_stage:
        grad_norm = engine.get_global_grad_norm()
    applied = engine.was_step_applied() and not held
    nonfinite = None
    if not applied:  # rare: every rank skipped this step (the reduced gradient says so), so all of them agree here
        nonfinite = "loss" if any_rank(not bool(loss_is_finite), device) else "gradient"
    return StepOutcome(loss=loss_sum / accumulation, applied=applied, nonfinite=nonfinite, grad_norm=grad_norm)


def _basic_optimizer(optimizer) -> HoldableAdamW:
    """The [`HoldableAdamW`] under DeepSpeed's wrappers (bf16 wraps it; fp32 without ZeRO uses it directly)."""
    while not isinstance(optimizer, HoldableAdamW):
        inner = getattr(optimizer, "optimizer", None)
        if inner is None:
            raise TypeError(f"ZeRO-0 needs the loop's HoldableAdamW, found {type(optimizer).__name__}")
        optimizer = inner
    return optimizer
