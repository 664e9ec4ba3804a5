"""`crate pretrain` end to end: 2 processes, gloo, real DeepSpeed ZeRO, real text; exports, resumes, signals."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launcher.train.watchdog import HUNG_EXIT_CODE
from tests.crate_cli import TINY_CRATE, run_rank_script
from tests.processes import children_of, ended, wait_for

REPO = Path(__file__).resolve().parents[3]
TINY = REPO / "configs" / "lm" / "crate-tiny.yaml"
EXPORT_MEMORY_RANK = Path(__file__).with_name("export_memory_rank.py")
SMALL = [
    *TINY_CRATE,
    "train.log_every=5",
    "train.eval_every=0",
    "optimizer.warmup_steps=2",
    "optimizer.lr=1.0e-2",
    "optimizer.min_lr=1.0e-3",
]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def shared_tokenizer(tmp_path_factory):
    """crate-tiny's bpe:N tokenizer trained once for the module (each run would retrain it in its own output_dir);
    the gpt2 baseline test keeps the bpe:N path itself covered."""
    from launcher.config.run import load_run_config
    from launcher.models.tokenizers import prepare_tokenizer, trained_tokenizer_dir

    root = tmp_path_factory.mktemp("tokenizer")
    prepare_tokenizer("bpe:1024", root, load_run_config(TINY).data)
    SMALL.append(f"tokenizer={trained_tokenizer_dir(root)}")
    yield
    SMALL.pop()


def pretrain_command(output_dir: Path, *overrides: str, nproc: int = 2, config: Path = TINY) -> list[str]:
    return [
        sys.executable,
        "-m",
        "launcher.cli",
        "pretrain",
        str(config),
        f"output_dir={output_dir}",
        *SMALL,
        *overrides,
        f"--nproc-per-node={nproc}",
    ]


def pretrain(
    output_dir: Path, *overrides: str, nproc: int = 2, config: Path = TINY, timeout: int = 600, env: dict | None = None
):
    return subprocess.run(
        pretrain_command(output_dir, *overrides, nproc=nproc, config=config),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )


def start_pretrain(output_dir: Path, *overrides: str, **popen) -> subprocess.Popen:
    """A 2-rank run in the background, returned once it has logged a loss."""
    process = subprocess.Popen(pretrain_command(output_dir, *overrides), cwd=REPO, text=True, **popen)
    metrics = output_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and '"loss"' in metrics.read_text()):
        assert process.poll() is None, f"the run ended ({process.returncode}) before it logged a loss"
        time.sleep(0.1)
    return process


def crate(*args: str, timeout: int = 300):
    return subprocess.run(
        [sys.executable, "-m", "launcher.cli", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def train_losses(output_dir: Path) -> list[float]:
    from launcher.metrics.logger import read_metrics

    return [row["loss"] for row in read_metrics(output_dir, kind="train") if "loss" in row]


def exported_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "hf" / "model.safetensors")


def measured_pretrain(output_dir: Path, *overrides: str) -> list[dict]:
    """A 2-rank run with the module's settings on ``export_memory_rank.py`` (torchrun): per rank, the parameter bytes
    held at every gather of its exports."""
    overrides = (f"output_dir={output_dir}", *SMALL, *overrides)
    return run_rank_script(EXPORT_MEMORY_RANK, output_dir / "export-memory.json", TINY, overrides)


def assert_exports_gather_a_module_at_most(ranks: list[dict]) -> None:
    """Issue 19: on every rank, each export starts with nothing gathered, gathers every parameter exactly once, and
    at each gather holds only what that gather asked for, never more than the largest module's own parameters: its
    peak is bounded by a module's bytes, not the model's."""
    for measured in ranks:
        largest, model = max(measured["module_bytes"].values()), measured["model_bytes"]
        assert model > 1.5 * largest  # a model clearly larger than its largest module (the embedding)
        assert measured["exports"]
        for export in measured["exports"]:
            gathers = export["gathers"]
            assert export["before"] == 0 and sum(gather["gathered"] for gather in gathers) == model
            assert all(gather["held"] == gather["gathered"] for gather in gathers), export
            assert max(gather["held"] for gather in gathers) <= largest < model
            assert len(gathers) < len(measured["module_bytes"])  # the small modules' parameters share gathers


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_train_export_and_reload_with_identical_logits(stage, tmp_path):
    run = ("train.max_steps=20", "train.save_every=10", "train.whitebox_every=10", "train.log_every=1")
    layers = 2
    if stage == 3:
        # The export's memory, measured on each rank, on enough layers that the model outweighs its largest module,
        # every parameter partitioned (by default DeepSpeed keeps any under 1e5 elements, all of this model's, whole)
        layers = 6
        (tmp_path / "ds.json").write_text('{"zero_optimization": {"stage3_param_persistence_threshold": 0}}')
        measured = measured_pretrain(
            tmp_path, *run, "zero.stage=3", f"model.num_hidden_layers={layers}", f"deepspeed_config={tmp_path}/ds.json"
        )
        assert_exports_gather_a_module_at_most(measured)
    else:
        result = pretrain(tmp_path, *run, f"zero.stage={stage}")
        assert result.returncode == 0, result.stderr[-4000:]
    losses = train_losses(tmp_path)
    assert losses[-1] < losses[0] - 0.75, losses  # from ln(1024) = 6.9 on real text
    from launcher.metrics.logger import read_metrics

    whitebox = read_metrics(tmp_path, kind="whitebox")  # every rank entered the measure (ZeRO-3 gathers)
    assert [(row["step"], row["layer"]) for row in whitebox] == [(s, i) for s in (10, 20) for i in range(layers)]
    assert all(row["rc"] > 0 and 0 <= row["sparsity_l0"] <= 1 for row in whitebox)
    state = next(row for row in read_metrics(tmp_path, kind="train") if row.get("event") == "model_state")
    params = next(row for row in read_metrics(tmp_path, kind="train") if row.get("event") == "start")["params"]
    # fp32 AdamW: weights, gradients and two moments are >= 16 B/parameter unpartitioned, at least half of it per rank
    assert 8 * params <= state["max_model_state_gib"] * 2**30 <= 40 * params

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModelForCausalLM

    import crate_lm  # noqa: F401

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    trained = AutoModelForCausalLM.from_config(exported.config).eval()
    state = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "checkpoints"), tag="global_step20")
    trained.load_state_dict(state, strict=False)
    trained.tie_weights()
    ids = torch.randint(0, exported.config.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.equal(exported(ids).logits, trained(ids).logits)

    # `crate export` merges the shards offline (one process): the newest step matches the at-save export exactly
    result = crate("export", str(tmp_path), "--out", str(tmp_path / "offline"))
    assert result.returncode == 0, result.stderr[-2000:]
    offline = load_file(tmp_path / "offline" / "model.safetensors")
    assert "- Final training loss: " in (tmp_path / "offline" / "README.md").read_text()  # the model card
    at_save = exported_weights(tmp_path)
    assert offline.keys() == at_save.keys() and all(torch.equal(offline[k], at_save[k]) for k in at_save)
    older = crate("export", str(tmp_path), "--step", "10")
    assert older.returncode == 0 and (tmp_path / "hf-step10" / "model.safetensors").exists(), older.stderr[-2000:]
    assert not torch.equal(
        load_file(tmp_path / "hf-step10" / "model.safetensors")["model.embed_tokens.weight"],
        at_save["model.embed_tokens.weight"],
    )
    missing = crate("export", str(tmp_path), "--step", "7")
    assert missing.returncode == 2 and "--step 7: no checkpoint of that step" in missing.stderr
    assert_crafted_pickles_never_run(tmp_path, 20)


def craft_into_checkpoint(output_dir: Path, step: int, name: str, marker: Path) -> None:
    """Issue 16's attack: ``name`` in the checkpoint replaced by a pickle that runs a command, the manifest's size
    and hash rewritten to match (the manifest guards against damage, not against an attacker)."""
    import hashlib
    import json

    from tests.launcher.train.test_safe_loading import craft

    directory = output_dir / "checkpoints" / f"global_step{step}"
    craft(directory / name, marker)
    manifest = json.loads((directory / "manifest.json").read_text())
    data = (directory / name).read_bytes()
    manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (directory / "manifest.json").write_text(json.dumps(manifest))


def assert_crafted_pickles_never_run(output_dir: Path, step: int) -> None:
    """The crafted pickle in each ``.pt`` file of the checkpoint in turn: ``crate export`` (in-process: the same
    readers as a resume) refuses it by name and the command never runs."""
    from launcher.errors import CheckpointError
    from launcher.train.export import export_checkpoint

    directory = output_dir / "checkpoints" / f"global_step{step}"
    originals = {path.name: path.read_bytes() for path in directory.iterdir()}
    pickled = sorted(name for name in originals if name.endswith(".pt"))
    assert pickled and not any(name.startswith("crate_rank") for name in pickled)  # ours: JSON and safetensors
    marker = output_dir / "the-command-ran"
    for name in pickled:
        craft_into_checkpoint(output_dir, step, name, marker)
        with pytest.raises(CheckpointError, match=f"{name}: refusing to unpickle it .*posix.system"):
            export_checkpoint(output_dir, step, output_dir / f"attacked-{name}")
        assert not marker.exists()
        for original, data in originals.items():
            (directory / original).write_bytes(data)


@pytest.mark.parametrize("stage", [2, 3])
def test_kill_9_of_a_rank_then_relaunch_equals_the_uninterrupted_run(stage, tmp_path):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    run = ("train.max_steps=60", "train.save_every=3", "train.log_every=1", f"zero.stage={stage}")
    assert pretrain(straight, *run).returncode == 0
    process = subprocess.Popen(
        pretrain_command(crashed, *run), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 300
    while time.time() < deadline and not (crashed / "checkpoints" / "global_step9").is_dir():
        time.sleep(0.05)
    os.kill(children_of(process.pid)[1], signal.SIGKILL)  # kill -9 one rank mid-run
    _, errors = process.communicate(timeout=300)
    assert process.returncode != 0
    assert not (crashed / "checkpoints" / "global_step60").exists(), "the run finished before the kill"
    second = pretrain(crashed, *run)
    assert second.returncode == 0, second.stderr[-4000:]
    a, b = exported_weights(straight), exported_weights(crashed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert train_losses(crashed)[-20:] == train_losses(straight)[-20:]  # the data neither repeats nor skips


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_sigterm_saves_exits_zero_and_resumes(sig, tmp_path):
    process = start_pretrain(
        tmp_path,
        "train.max_steps=100000",
        "train.save_every=0",
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    os.killpg(process.pid, sig)  # as Slurm and a terminal's Ctrl-C do: the whole process group
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-4000:]
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output[-4000:]
    saved = sorted((tmp_path / "checkpoints").glob("global_step*"))
    assert len(saved) == 1
    stopped_at = int(saved[0].name.removeprefix("global_step"))
    resumed = pretrain(tmp_path, f"train.max_steps={stopped_at + 3}", "train.save_every=0")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert (tmp_path / "checkpoints" / f"global_step{stopped_at + 3}").is_dir()


def test_a_stopped_rank_ends_every_rank_with_one_line_and_the_launcher_fails(tmp_path):
    """SIGSTOP on rank 1 leaves rank 0 blocked in a collective; its watchdog stops it with one line after
    train.collective_timeout_minutes, then the launcher sends rank 1 SIGTERM and SIGCONT, and it ends too."""
    run = ("train.max_steps=100000", "train.save_every=0", "train.log_every=1", "train.collective_timeout_minutes=0.15")
    process = start_pretrain(tmp_path, *run, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ranks = children_of(process.pid)
    try:
        os.kill(ranks[1], signal.SIGSTOP)
        stopped = time.monotonic()
        _, errors = process.communicate(timeout=120)
        took = time.monotonic() - stopped
    finally:
        for pid in ranks:
            if not ended(pid):
                os.kill(pid, signal.SIGKILL)
    assert process.returncode == HUNG_EXIT_CODE, errors[-4000:]
    hung = [line for line in errors.splitlines() if line.startswith("rank 0: no progress for 0.15 min in the ")]
    assert len(hung) == 1 and hung[0].endswith("a rank is hung or dead - stopping (train.collective_timeout_minutes)")
    # the watchdog's 9 s (from its last pet, up to a phase before the stop), well before the process group's own
    # timeout (69 s) and the launcher's SIGKILL (30 s after rank 0 failed): SIGCONT let rank 1 stop at once
    assert 7 < took < 9 + 20, (took, errors[-4000:])
    assert all(ended(pid) for pid in ranks)


def test_killing_the_launcher_stops_its_ranks_gracefully(tmp_path):
    """kill -9 of `crate pretrain --nproc-per-node 2`: the ranks get SIGTERM (the parent-death signal), agree on a
    step, save and exit, rather than live on as orphans."""
    with (tmp_path / "stderr.txt").open("w") as stderr:
        process = start_pretrain(
            tmp_path,
            "train.max_steps=100000",
            "train.save_every=0",
            "train.log_every=1",
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        ranks = children_of(process.pid)
        process.kill()
        process.wait()
        killed = time.monotonic()
        wait_for(lambda: all(ended(pid) for pid in ranks), 60)
        took = time.monotonic() - killed
    alive = [pid for pid in ranks if not ended(pid)]
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    errors = (tmp_path / "stderr.txt").read_text()
    assert not alive and took < 30, (took, errors[-4000:])
    assert "Traceback" not in errors, errors[-4000:]
    from launcher.metrics.logger import read_metrics

    stopped = [row for row in read_metrics(tmp_path, kind="train") if row.get("event") == "stopped"]
    assert [row["reason"] for row in stopped] == ["signal"]
    assert (tmp_path / "checkpoints" / f"global_step{stopped[0]['step']}").is_dir()


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path):
    assert pretrain(tmp_path, "train.max_steps=10", "train.save_every=5").returncode == 0
    newest = tmp_path / "checkpoints" / "global_step10"
    victim = next(p for p in newest.rglob("*.pt") if p.stat().st_size > 1000)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    resumed = pretrain(tmp_path, "train.max_steps=12", "train.save_every=0")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "global_step10 is unusable (truncated file" in resumed.stderr
    from launcher.metrics.logger import read_metrics

    starts = [row for row in read_metrics(tmp_path, kind="train") if row.get("event") == "start"]
    assert starts[-1]["resumed"] and starts[-1]["step"] == 5
    # What a resume cannot honour (here a changed micro-batch size, by which the data order is counted) is refused in
    # one line, before any process, and by the loop itself under a launcher (torchrun's variables: no preflight).
    from launcher.cluster.processes import free_port

    port = str(free_port())
    launcher = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    for env in ({}, launcher):
        refused = pretrain(tmp_path, "train.max_steps=14", "train.micro_batch_size=2", nproc=1, env=env)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-4000:]
        last_line = refused.stderr.strip().splitlines()[-1]
        assert last_line.startswith("crate pretrain: error: train.micro_batch_size: 2, and the checkpoint "), last_line
        assert f"{tmp_path}/checkpoints/global_step12 was trained at 4;" in last_line

    # A crafted pickle (its manifest entry rewritten to match) stops the resume on every rank, naming the file
    marker = tmp_path / "the-command-ran"
    from launcher.train.checkpoint import CheckpointManager

    newest = CheckpointManager(tmp_path, keep_last=1).newest_valid()[0]
    craft_into_checkpoint(tmp_path, newest, "mp_rank_00_model_states.pt", marker)
    attacked = pretrain(tmp_path, "train.max_steps=14", "train.save_every=0")
    assert attacked.returncode == 2 and not marker.exists(), attacked.stderr[-4000:]
    assert "mp_rank_00_model_states.pt: refusing to unpickle it (it would call posix.system" in attacked.stderr
    assert "Traceback" not in attacked.stderr


def test_gpt2_baseline_trains_through_the_same_command(tmp_path):
    """Also: the bpe:N tokenizer is trained into the run at start and exported with the model; white-box measures
    run on the baseline through hooks; `crate generate` samples through transformers.pipeline."""
    config = REPO / "configs" / "lm" / "gpt2-tiny.yaml"
    result = pretrain(
        tmp_path,
        "train.max_steps=10",
        "train.save_every=10",
        "train.whitebox_every=10",
        "tokenizer=bpe:512",
        config=config,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert train_losses(tmp_path)[-1] < train_losses(tmp_path)[0]
    assert (tmp_path / "tokenizer" / "tokenizer.json").exists() and (tmp_path / "hf" / "tokenizer.json").exists()
    from launcher.metrics.logger import read_metrics

    assert len(read_metrics(tmp_path, kind="whitebox")) == 2  # one row per layer
    sample = crate("generate", str(tmp_path / "hf"), "--prompt", "ROMEO:", "--max-new-tokens", "8")
    assert sample.returncode == 0 and sample.stdout.startswith("ROMEO:"), sample.stderr[-2000:]


def _module_weights(output_dir: Path, step: int) -> dict[str, torch.Tensor]:
    path = output_dir / "checkpoints" / f"global_step{step}" / "mp_rank_00_model_states.pt"
    return torch.load(path, map_location="cpu", weights_only=False)["module"]


@pytest.mark.parametrize("stage", [0, 2])
def test_nonfinite_loss_or_gradient_skips_the_step_on_every_rank(stage, tmp_path):
    # step 3: NaN gradient on rank 1 only (the loss stays finite); step 4: NaN loss on every rank
    result = pretrain(
        tmp_path,
        "train.max_steps=5",
        "train.save_every=1",
        "train.keep_last=10",
        "train.log_every=1",
        f"zero.stage={stage}",
        env={"CRATE_INJECT_FAULTS": "nan_grad@3:1,nan_loss@4"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    from launcher.metrics.logger import read_metrics

    skipped = [
        (row["step"], row["reason"])
        for row in read_metrics(tmp_path, kind="train")
        if row.get("event") == "nonfinite_step_skipped"
    ]
    assert skipped == [(3, "gradient"), (4, "loss")]
    before, after, next_step = (_module_weights(tmp_path, step) for step in (2, 4, 5))
    assert all(torch.equal(before[k], after[k]) for k in before), "a skipped step changed the weights"
    assert not all(torch.equal(after[k], next_step[k]) for k in after)
    assert all(torch.isfinite(value).all() for value in next_step.values())


def test_too_many_nonfinite_steps_in_a_row_stop_with_the_step_named(tmp_path):
    result = pretrain(
        tmp_path,
        "train.max_steps=20",
        "train.save_every=1",
        "train.max_nonfinite_in_a_row=3",
        env={"CRATE_INJECT_FAULTS": "nan_loss@3-20"},
    )
    assert result.returncode != 0
    assert "step 5: 3 steps in a row skipped for a non-finite loss (train.max_nonfinite_in_a_row)" in result.stderr
    # what was saved is intact: the skipped steps 3 and 4 were saved with step 2's weights, step 5 never was
    assert (tmp_path / "checkpoints" / "latest").read_text() == "global_step4"
    before, last = _module_weights(tmp_path, 2), _module_weights(tmp_path, 4)
    assert all(torch.equal(before[k], last[k]) for k in before)


def _spoil_the_first_line_of_each_shard(path: Path, min_shards: int) -> list[int]:
    """Overwrite the first line of each of the file's shards with a bad record of the same length (so the shards stay
    where they are): the first without a text field, the others not JSON. Returns their line numbers."""
    from data_pipeline.sources import discover_shards
    from data_pipeline.spec import parse_text_data

    shards = discover_shards(parse_text_data({"sources": [{"path": str(path)}], "min_shards": min_shards}), 0)
    lines = path.read_bytes().splitlines(keepends=True)
    starts = [sum(len(line) for line in lines[:n]) for n in range(len(lines))]
    numbers = [next(n for n, start in enumerate(starts) if start >= shard.start) for shard in shards]
    for k, n in enumerate(numbers):
        width = len(lines[n]) - 1
        lines[n] = (b'{"title": ""}'.ljust(width) if k == 0 else b"x" * width) + b"\n"
    path.write_bytes(b"".join(lines))
    return [n + 1 for n in numbers]


def test_eval_data_gives_validation_loss_and_bad_records_are_reported_from_every_rank(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    import json

    from data_pipeline.builtin import iter_documents

    texts = [d["text"] for d, _ in zip(iter_documents("shakespeare"), range(40))]
    for name, part in (("train.jsonl", texts[:-4]), ("held_out.jsonl", texts[-4:])):
        (corpus / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in part))
    train = corpus / "train.jsonl"
    spoiled = _spoil_the_first_line_of_each_shard(train, min_shards=2)  # one shard, one bad record per rank
    result = pretrain(
        tmp_path / "run",
        "train.max_steps=4",
        "train.eval_every=2",
        "train.eval_batches=2",
        "train.save_every=0",
        "data.min_shards=2",
        "data.streams_per_rank=1",
        "data.max_bad_fraction=0.1",
        f"data.sources=[{{path: {train}}}]",
        f"eval_data={{sources: [{{path: {corpus / 'held_out.jsonl'}}}]}}",
    )
    assert result.returncode == 0, result.stderr[-4000:]
    from launcher.metrics.logger import read_metrics

    evals = read_metrics(tmp_path / "run", kind="eval")
    assert [row["step"] for row in evals] == [2, 4] and all(math.isfinite(row["loss"]) for row in evals)
    # Each rank skipped the bad record of its own shard: the run reports both, from rank 0.
    first = [f"{train}: line {spoiled[0]}: missing_text_field", f"{train}: line {spoiled[1]}: invalid_json"]
    row = [row for row in read_metrics(tmp_path / "run", kind="train") if "loss" in row][-1]
    assert row["bad_records"] == {
        "total": 2,
        "by_reason": {"missing_text_field": 1, "invalid_json": 1},
        "by_source": {str(train): 2},
        "first": first,
    }
    warning = f"step 4 warning: 2 bad records skipped so far (within data.max_bad_fraction): {train} (2); first: "
    assert warning + "; ".join(first) in result.stderr and "| bad 2" in result.stderr
    assert "no validation" not in result.stderr


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.micro_batch_size=0", "train.micro_batch_size: Input should be greater than or equal to 1"),
        ("zero.offload_params=true", "zero: offload_params needs ZeRO stage 3"),
        ("data.seq_len=128", "data.seq_len: 128 exceeds the model's max_position_embeddings (64)"),
        (
            "train.global_batch_size=6",
            "train.global_batch_size: 6 is not a multiple of train.micro_batch_size (4) x world size (2)",
        ),
    ],
)
def test_bad_configs_fail_before_any_process_with_one_line(override, message, tmp_path):
    result = pretrain(tmp_path, "train.max_steps=1", override, timeout=120)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_zero3_with_cpu_offload_and_activation_checkpointing_trains(tmp_path):
    result = pretrain(
        tmp_path,
        "train.max_steps=12",
        "train.save_every=12",
        "train.log_every=1",
        "zero.stage=3",
        "zero.offload_optimizer=true",
        "zero.offload_params=true",
        "train.activation_checkpointing=true",
    )
    assert result.returncode == 0, result.stderr[-4000:]
    losses = train_losses(tmp_path)
    assert losses[-1] < losses[0] - 0.5, losses
    assert (tmp_path / "hf" / "model.safetensors").exists()


def test_torch_compile_trains_like_eager_and_exports(tmp_path):
    run = ("train.max_steps=6", "train.save_every=6", "train.log_every=1", "zero.stage=0")
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert pretrain(eager, *run, nproc=1).returncode == 0
    result = pretrain(compiled, *run, "train.compile=true", nproc=1)
    assert result.returncode == 0, result.stderr[-4000:]
    assert train_losses(compiled) == pytest.approx(train_losses(eager), rel=1e-4)
    a, b = exported_weights(eager), exported_weights(compiled)
    assert a.keys() == b.keys()  # no torch.compile wrapper prefixes in the export
