"""The groups a ZeRO-3 export gathers (issue 19): every parameter once, no module split, none larger than the
largest module. The real gathers are measured in a 2-rank ZeRO-3 run (test_pretrain.py); this checks the grouping on
a plain model, its parameters marked with their whole size as ZeRO-3 marks them (``ds_numel``)."""

from __future__ import annotations

import torch
from torch import nn

from launcher.train.export import gather_groups


def tied_model() -> nn.Module:
    """An embedding (the largest module), six small layers and a head tied to the embedding."""
    model = nn.Sequential(nn.Embedding(256, 16), *[nn.Linear(16, 16) for _ in range(6)], nn.Linear(16, 256))
    model[-1].weight = model[0].weight
    for parameter in model.parameters():
        parameter.ds_numel = parameter.numel()
    return model


def test_groups_hold_every_parameter_once_and_none_more_than_the_largest_module():
    model = tied_model()
    groups = gather_groups(model)
    flat = [p for group in groups for p in group]
    assert [id(p) for p in flat] == [id(p) for p in model.parameters()]  # each once, tied once, in module order
    sizes = [sum(p.numel() for p in group) for group in groups]
    assert max(sizes) == 256 * 16  # the embedding, alone
    assert len(groups) < 1 + 6 + 1  # the small layers share gathers
    for module in model.modules():  # a module's own parameters are gathered together
        own = {id(p) for p in module.parameters(recurse=False)} - {id(model[0].weight)}
        assert own == set() or any(own <= {id(p) for p in group} for group in groups)


def test_a_model_of_equal_modules_gathers_one_at_a_time():
    model = nn.Sequential(*[nn.Linear(8, 8, bias=False) for _ in range(3)])
    for parameter in model.parameters():
        parameter.ds_numel = parameter.numel()
    assert [len(group) for group in gather_groups(model)] == [1, 1, 1]
    assert gather_groups(nn.Sequential(nn.ReLU())) == []
    assert torch.equal(gather_groups(model)[0][0], model[0].weight)
