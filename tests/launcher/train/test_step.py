"""The loop's step helpers on their own: the accelerator out-of-memory error that names the knobs, and the optimizer
that holds back one update."""

import pytest
import torch

from launcher.errors import CrateError, OutOfMemoryError
from launcher.train.step import DEVICE_OUT_OF_MEMORY, HoldableAdamW, memory_knobs_on_oom


def test_out_of_memory_becomes_one_line_naming_the_knobs():
    with pytest.raises(OutOfMemoryError) as info, memory_knobs_on_oom("step 3"):
        raise DEVICE_OUT_OF_MEMORY("CUDA out of memory. Tried to allocate 20.00 GiB\nmore detail")
    message = str(info.value)
    assert isinstance(info.value, CrateError) and "\n" not in message
    assert message.startswith("out of memory during step 3 (CUDA out of memory. Tried to allocate 20.00 GiB)")
    for knob in ("train.micro_batch_size", "train.activation_checkpointing", "zero.stage", "zero.offload_optimizer"):
        assert knob in message
    assert isinstance(info.value.__cause__, DEVICE_OUT_OF_MEMORY)  # the original stays chained


def test_other_errors_pass_through_untouched():
    with pytest.raises(KeyError), memory_knobs_on_oom("step 1"):
        raise KeyError("a bug")


def test_held_step_changes_nothing_and_the_next_one_applies():
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = HoldableAdamW([weight], lr=0.1)
    weight.grad = torch.ones(3)
    with optimizer.held():
        optimizer.step()
    assert torch.equal(weight.detach(), torch.ones(3)) and not optimizer.state  # no moments, no step count
    with optimizer.held():
        pass  # a wrapper skipped the step itself: nothing stays pending
    optimizer.step()
    assert (weight.detach() < 1).all() and optimizer.state[weight]["step"] == 1
