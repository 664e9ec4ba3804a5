"""One rank of ``crate pretrain`` under torchrun that counts, per optimizer step, the collectives it issues and the
host reads of tensors (``item``, ``tolist``, ``bool``, ``float``, ``int``, ``numpy``: on a GPU each one waits for
the device), and who issued them: the harness (``ours``: launcher/, crate_lm/), DeepSpeed, HF transformers, or
torch itself (``torch.optim``'s reads of its step counters, host tensors on any machine, are its own). Host reads
made by the data pipeline (host tensors on any machine) are left out.

    torchrun --standalone --nproc-per-node 2 tests/launcher/train/counted_rank.py OUT.json CONFIG [KEY=VALUE ...]

Step k's counts run from the start of optimizer step k to the start of step k + 1 (its side jobs included).
Rank r writes ``OUT.json`` with ``.rank{r}`` before the suffix: ``{"steps": [{"collectives": {who: {name: n}},
"host_reads": {who: {name: n}}}, ...]}``; the harness's names carry their ``file:line``.
"""

from __future__ import annotations

import collections
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))

COLLECTIVES = (
    "all_reduce",
    "all_reduce_coalesced",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "reduce",
    "broadcast",
    "broadcast_object_list",
    "barrier",
    "monitored_barrier",
    "all_to_all",
    "all_to_all_single",
    "gather",
    "gather_object",
    "scatter",
    "send",
    "recv",
    "isend",
    "irecv",
)
PRIVATE_COLLECTIVES = ("_all_gather_base", "_reduce_scatter_base", "_all_gather_base_coalesced")
HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy")

OURS = tuple(str(REPO / part) + os.sep for part in ("launcher", "crate_lm"))
DATA = (str(REPO / "data_pipeline") + os.sep, os.path.join("torch", "utils", "data") + os.sep)
TORCH_OPTIM = os.path.join("torch", "optim") + os.sep
PASS_THROUGH = (os.path.dirname(torch.__file__) + os.sep, os.sep + os.path.join("deepspeed", "comm") + os.sep)

counts = {kind: collections.defaultdict(collections.Counter) for kind in ("collectives", "host_reads")}
enabled = False


def _passes_through(filename: str) -> bool:
    return filename == __file__ or filename.startswith(PASS_THROUGH[0]) or PASS_THROUGH[1] in filename


def _caller() -> tuple[str, str | None]:
    """Who called (the first frame outside torch, DeepSpeed's comm wrappers and this file), and for the harness's own
    calls where (``file:line``)."""
    frame = sys._getframe(2)
    while frame is not None and _passes_through(frame.f_code.co_filename):
        if TORCH_OPTIM in frame.f_code.co_filename:  # its step counters live on the host on every machine
            return "torch.optim", None
        frame = frame.f_back
    if frame is None:
        return "torch", None
    name = frame.f_code.co_filename
    if name.startswith(OURS):
        return "ours", f"{os.path.relpath(name, REPO)}:{frame.f_lineno}"
    if name.startswith(DATA[0]) or DATA[1] in name:
        return "data", None
    for who in ("deepspeed", "transformers", "peft"):
        if f"{os.sep}{who}{os.sep}" in name:
            return who, None
    return "other:" + os.path.relpath(name, REPO), None


def _count(kind: str, name: str, original):
    def counted(*args, **kwargs):
        if enabled:
            who, where = _caller()
            if kind == "collectives" or who != "data":
                counts[kind][who][f"{name} {where}" if who == "ours" else name] += 1
        return original(*args, **kwargs)

    counted.__wrapped__ = original
    return counted


def install() -> None:
    for name in COLLECTIVES:
        setattr(dist, name, _count("collectives", name, getattr(dist, name)))
    for name in PRIVATE_COLLECTIVES:
        if hasattr(dist.distributed_c10d, name):
            setattr(dist.distributed_c10d, name, _count("collectives", name, getattr(dist.distributed_c10d, name)))
    for name in HOST_READS:
        setattr(torch.Tensor, name, _count("host_reads", name, getattr(torch.Tensor, name)))


def main() -> int:
    global enabled
    out, config_path, overrides = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    install()
    import launcher.train.loop as loop
    from launcher.cluster.local import pretrain

    steps: list[dict] = []
    step_of_the_loop = loop.train_step

    def snapshot():
        return {kind: {who: dict(c) for who, c in by_who.items()} for kind, by_who in counts.items()}

    def counted_step(*args, **kwargs):
        global enabled
        if enabled:
            steps.append(snapshot())
        for by_who in counts.values():
            by_who.clear()
        enabled = True
        return step_of_the_loop(*args, **kwargs)

    loop.train_step = counted_step
    status = pretrain(config_path, overrides)
    enabled = False
    steps.append(snapshot())  # the last step and the loop's end (the final barrier)
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))
    out.with_name(f"{out.stem}.rank{rank}{out.suffix}").write_text(json.dumps({"steps": steps}))
    return status


if __name__ == "__main__":
    sys.exit(main())
