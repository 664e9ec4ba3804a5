"""One rank of ``crate pretrain`` under torchrun that measures, during each HF export, the parameter bytes this rank
holds whole at every ZeRO-3 gather.

    torchrun --standalone --nproc-per-node 2 tests/launcher/train/export_memory_rank.py OUT.json CONFIG [KEY=VALUE ...]

Under ZeRO-3 a partitioned parameter's ``data`` is an empty tensor except while it is gathered, so the bytes of the
``data`` of all the model's parameters are what the rank holds gathered at that moment. They are read right after
every ``deepspeed.zero.GatheredParameters`` has gathered (the moment an export's memory peaks) while ``export_hf`` of
the loop runs. Rank r writes ``OUT.json`` with ``.rank{r}`` before the suffix: ``{"exports": [{"before": bytes,
"gathers": [{"held": bytes, "gathered": bytes}, ...]}, ...], "model_bytes": ..., "module_bytes": {name: bytes}}``,
where ``gathered`` is the bytes of the parameters that gather asked for and ``module_bytes`` each module's own
parameters (tied ones counted at their first module, as a gather of them would be).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))


def held_bytes(parameters) -> int:
    """Bytes of the parameters' ``data`` now: a partitioned parameter's is empty, a gathered one's is whole."""
    return sum(p.data.numel() * p.data.element_size() for p in parameters)


def full_bytes(parameter) -> int:
    return getattr(parameter, "ds_numel", parameter.numel()) * parameter.element_size()


def main() -> int:
    import deepspeed

    import launcher.train.loop as loop
    from launcher.cluster.local import pretrain

    out, config_path, overrides = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    exports: list[dict] = []
    sizes: dict = {}
    exporting: list = []  # the model while an export runs

    gathered_parameters = deepspeed.zero.GatheredParameters
    enter = gathered_parameters.__enter__

    def measured_enter(self):
        result = enter(self)
        if exporting and self.enabled:
            parameters = list(exporting[0].parameters())
            exports[-1]["gathers"].append(
                {"held": held_bytes(parameters), "gathered": sum(full_bytes(p) for p in self.params)}
            )
        return result

    gathered_parameters.__enter__ = measured_enter
    export_of_the_loop = loop.export_hf

    def measured_export(model, *args, **kwargs):
        parameters = list(model.parameters())
        if not sizes:
            seen: set[int] = set()
            module_bytes = {}
            for name, module in model.named_modules():
                own = [p for p in module.parameters(recurse=False) if id(p) not in seen]
                seen.update(id(p) for p in own)
                if own:
                    module_bytes[name] = sum(full_bytes(p) for p in own)
            sizes.update(model_bytes=sum(full_bytes(p) for p in parameters), module_bytes=module_bytes)
        exports.append({"before": held_bytes(parameters), "gathers": []})
        exporting.append(model)
        try:
            return export_of_the_loop(model, *args, **kwargs)
        finally:
            exporting.clear()

    loop.export_hf = measured_export
    status = pretrain(config_path, overrides)
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))
    out.with_name(f"{out.stem}.rank{rank}{out.suffix}").write_text(json.dumps({"exports": exports, **sizes}))
    return status


if __name__ == "__main__":
    sys.exit(main())
