"""``crate tune``: the bracketing rule on synthetic loss curves (the minimum below and above the first grid, flat
curves, diverged runs), and the tuning itself with a cheap fake run function instead of training: the grid grows on
the side of the best, the record and the figure, the cap, and a rerun that runs nothing new."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from launcher.cluster.sweep import load_sweep
from launcher.cluster.tune import first_grid, load_tune_file, next_values, round_sweep, tune
from launcher.errors import ConfigError
from tests.crate_cli import REPO

LM = REPO / "configs" / "lm"


def bowl(optimum: float):
    """A loss curve with its minimum at ``optimum``: quadratic in log2 of the learning rate."""
    return lambda lr: 3.0 + math.log2(lr / optimum) ** 2


def bracket(curve, centre: float = 1e-3, factor: float = 2.0, cap: int = 10) -> tuple[dict, int]:
    """The tuning loop without training: the losses of every value tried and the number of extensions."""
    losses = {lr: curve(lr) for lr in first_grid(centre, 3, factor)}
    for extension in range(cap + 1):
        more = next_values(losses, factor)
        if not more or extension == cap:
            return losses, extension
        losses.update({lr: curve(lr) for lr in more})


def test_the_first_grid_is_centred_on_a_log_scale():
    assert first_grid(1e-3, 3, 2.0) == [5e-4, 1e-3, 2e-3]
    assert first_grid(1e-3, 4, 2.0) == [2.5e-4, 5e-4, 1e-3, 2e-3]
    assert first_grid(1e-3, 1, math.sqrt(2)) == [1e-3]


def test_a_minimum_below_the_first_grid_is_reached_and_bracketed():
    losses, extensions = bracket(bowl(1.25e-4))
    assert sorted(losses) == [6.25e-5, 1.25e-4, 2.5e-4, 5e-4, 1e-3, 2e-3] and extensions == 3
    assert min(losses, key=losses.get) == 1.25e-4 and next_values(losses, 2.0) == ()


def test_a_minimum_above_the_first_grid_is_reached_and_bracketed():
    losses, extensions = bracket(bowl(8e-3))
    assert sorted(losses) == [5e-4, 1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2] and extensions == 3
    assert min(losses, key=losses.get) == 8e-3


def test_a_best_inside_the_grid_is_bracketed_at_once():
    assert next_values({5e-4: 3.2, 1e-3: 3.0, 2e-3: 3.1}, 2.0) == ()
    assert next_values({5e-4: 3.2, 1e-3: 3.0, 2e-3: 3.0, 4e-3: 3.3}, 2.0) == ()  # a plateau inside the grid


def test_a_flat_curve_grows_on_both_sides_until_the_cap():
    assert next_values({5e-4: 3.0, 1e-3: 3.0, 2e-3: 3.0}, 2.0) == (2.5e-4, 4e-3)
    losses, extensions = bracket(lambda lr: 3.0, cap=2)
    assert extensions == 2 and sorted(losses) == [1.25e-4, 2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3, 8e-3]


def test_a_diverged_run_counts_as_worse():
    assert next_values({5e-4: 3.1, 1e-3: 3.0, 2e-3: math.nan}, 2.0) == ()
    assert next_values({5e-4: 3.1, 1e-3: math.inf, 2e-3: None}, 2.0) == (2.5e-4,)
    assert next_values({5e-4: math.nan, 1e-3: math.nan, 2e-3: math.inf}, 2.0) == (2.5e-4,)  # all diverged: lower


# ----------------------------------------------------------------------------------------------------------------------
# The tuning, with a fake run function
# ----------------------------------------------------------------------------------------------------------------------

CURVES = {
    "crate": bowl(8e-3),  # above the first grid
    "gpt2": bowl(1.25e-4),  # below it
    "llama": lambda lr: math.nan if lr >= 2e-3 else bowl(1e-3)(lr),  # diverges above its optimum
}


def tune_file(tmp_path: Path, **tune) -> Path:
    body = {
        "name": "tune",
        "output_root": str(tmp_path / "runs"),
        "config": str(LM / "crate-tiny.yaml"),
        "overrides": {"train.max_steps": 5, "train.eval_every": 5, "train.whitebox_every": 0},
        "axes": {
            "arch": {
                "crate": {"model.preset": "crate-tiny"},
                "gpt2": {"config": str(LM / "gpt2-tiny.yaml")},
                "llama": {"config": str(LM / "gpt2-tiny.yaml"), "model.arch": "llama"},
            }
        },
        "tune": {"centre": 1e-3, "points": 3, "factor": 2, **tune},
    }
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


class FakeRuns:
    """Runs a round's sweep as the sweep machinery does (a finished run is skipped), in microseconds: a run writes
    the eval row of its last step with the loss its architecture's curve gives its learning rate."""

    def __init__(self):
        self.ran: list[str] = []

    def __call__(self, sweep) -> None:
        for run in sweep.runs:
            metrics = Path(run.output_dir) / "metrics.jsonl"
            if metrics.exists():
                continue
            overrides = dict(item.split("=", 1) for item in run.overrides)
            loss = CURVES[run.labels["arch"]](float(overrides["optimizer.lr"]))
            assert float(overrides["optimizer.min_lr"]) == pytest.approx(0.1 * float(overrides["optimizer.lr"]))
            metrics.parent.mkdir(parents=True)
            metrics.write_text(json.dumps({"kind": "eval", "step": int(overrides["train.max_steps"]), "loss": loss}))
            self.ran.append(run.name)


def test_tune_extends_each_grid_on_the_side_of_its_best_and_records_it(tmp_path):
    path = tune_file(tmp_path)
    runs = FakeRuns()
    record = tune(path, runs, log=lambda line: None)
    crate, gpt2, llama = (record["groups"][arch] for arch in ("crate", "gpt2", "llama"))
    assert [point["value"] for point in crate["tried"]] == [5e-4, 1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2]
    assert [point["value"] for point in gpt2["tried"]] == [6.25e-5, 1.25e-4, 2.5e-4, 5e-4, 1e-3, 2e-3]
    assert crate["chosen"] == 8e-3 and crate["chosen_run"] == "crate-lr0.008" and crate["chosen_loss"] == 3.0
    assert gpt2["chosen"] == 1.25e-4 and gpt2["extensions"] == 3 and gpt2["bracketed"] and not gpt2["cap_reached"]
    # llama's diverged run is recorded without a loss and counts as worse: bracketed by the first grid
    assert [point["loss"] for point in llama["tried"]] == [4.0, 3.0, None]
    assert llama["chosen"] == 1e-3 and llama["bracketed"] and llama["extensions"] == 0
    assert json.loads((tmp_path / "runs" / "tuning.json").read_text()) == record
    assert (tmp_path / "runs" / "lr_curves.png").stat().st_size > 10_000
    manifest = json.loads((tmp_path / "runs" / "sweep.json").read_text())
    assert len(manifest["runs"]) == len(runs.ran) == 6 + 6 + 3
    assert manifest["runs"][0]["labels"] == {"arch": "crate", "lr": "lr0.0005"}  # crate compare --best-over lr

    rerun = FakeRuns()  # another session: every run is finished, nothing new is run, the same record
    assert tune(path, rerun, log=lambda line: None) == record and rerun.ran == []


def test_the_cap_stops_the_grid_and_is_reported(tmp_path):
    path = tune_file(tmp_path, max_extensions=1)
    lines = []
    record = tune(path, FakeRuns(), log=lines.append)
    crate = record["groups"]["crate"]
    assert [point["value"] for point in crate["tried"]] == [5e-4, 1e-3, 2e-3, 4e-3]
    assert crate["chosen"] == 4e-3 and not crate["bracketed"] and crate["cap_reached"] and crate["extensions"] == 1
    assert "tune crate: chosen optimizer.lr=0.004 (eval loss 4.0), NOT bracketed (cap of 1 extensions)" in lines


def test_tuning_files_are_checked_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"tune.factor: Input should be greater than 1"):
        load_tune_file(tune_file(tmp_path, factor=1))
    with pytest.raises(ConfigError, match=r"tune.colour: unknown key"):
        load_tune_file(tune_file(tmp_path, colour="red"))
    with pytest.raises(ConfigError, match=r"tune: a tuning file; run it with crate tune"):
        load_sweep(tune_file(tmp_path))
    raw = yaml.safe_load(tune_file(tmp_path).read_text())
    raw["axes"]["lr"] = {"a": {}}
    (tmp_path / "clash.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"tune.axis: 'lr' is already an axis of the file"):
        load_tune_file(tmp_path / "clash.yaml")
    path = tune_file(tmp_path)
    path.write_text(path.read_text().replace("train.eval_every: 5", "train.eval_every: 0"))
    spec, raw = load_tune_file(path)
    with pytest.raises(ConfigError, match=r"run crate-lr0.0005: train.eval_every is 0; tuning needs"):
        round_sweep(spec, raw, path, {"crate": {5e-4}})


@pytest.mark.parametrize(
    "name", ["lm-tune-whitebox", "lm-tune-baselines", "vision-tune-crate", "vision-tune-tost-vit"], ids=str
)
def test_the_studys_tuning_files_validate_every_first_run_and_seed(name):
    """configs/study: the first grid of every architecture and the seed replicates of a chosen value validate."""
    from launcher.cluster.tune import seed_sweep

    path = REPO / "configs" / "study" / f"{name}.yaml"
    spec, raw = load_tune_file(path)
    groups = list(spec.axes["arch"])
    sweep = round_sweep(spec, raw, path, {arch: set(first_grid(spec.tune.centre, 3, 2.0)) for arch in groups})
    assert len(sweep.runs) == 3 * len(groups) and spec.tune.seeds == [0, 1, 2]
    record = {"groups": {arch: {"chosen": spec.tune.centre} for arch in groups}}
    everything, replicates, base = seed_sweep(spec, raw, path, sweep, record)
    assert base == 0 and len(replicates) == 2 * len(groups) and len(everything.runs) == 5 * len(groups)


def test_the_shipped_tuning_file_validates_every_first_run():
    path = REPO / "configs" / "sweeps" / "lm-lr-tune-cpu.yaml"
    spec, raw = load_tune_file(path)
    sweep = round_sweep(spec, raw, path, {arch: set(first_grid(1e-3, 3, 2.0)) for arch in ("crate", "gpt2", "llama")})
    assert [run.name for run in sweep.runs][:3] == ["crate-lr0.0005", "crate-lr0.001", "crate-lr0.002"]
    assert len(sweep.runs) == 9 and "model.arch=llama" in sweep.runs[-1].overrides


class SeededFakeRuns(FakeRuns):
    """FakeRuns whose loss also depends on the seed (0.01 nats a seed), as replicates do."""

    def __call__(self, sweep) -> None:
        super().__call__(sweep)
        for run in sweep.runs:
            seed = dict(item.split("=", 1) for item in run.overrides).get("train.seed")
            if seed and run.name in self.ran[-len(sweep.runs) :]:
                metrics = Path(run.output_dir) / "metrics.jsonl"
                row = json.loads(metrics.read_text())
                metrics.write_text(json.dumps({**row, "loss": row["loss"] + 0.01 * int(seed)}))


def test_tune_seeds_replicate_each_chosen_value_and_label_every_run(tmp_path):
    """tune.seeds: after the bracketing, each group's chosen value again with each other seed; the record lists
    every seed's loss (the tuning's own first), and sweep.json labels every run on the seed axis so that crate
    compare --best-over lr --seed-axis seed keeps all seeds of the chosen value."""
    path = tune_file(tmp_path, seeds=[0, 1, 2])  # 0 is the run config's own train.seed: not run twice
    runs = SeededFakeRuns()
    record = tune(path, runs, log=lambda line: None)
    crate = record["groups"]["crate"]
    assert [(row["seed"], row["run"]) for row in crate["seeds"]] == [
        (0, "crate-lr0.008"),
        (1, "crate-lr0.008-seed1"),
        (2, "crate-lr0.008-seed2"),
    ]
    assert [row["loss"] for row in crate["seeds"]] == pytest.approx([3.0, 3.01, 3.02])
    assert len(runs.ran) == 15 + 6  # two replicates for each of the three groups
    manifest = json.loads((tmp_path / "runs" / "sweep.json").read_text())
    assert manifest["runs"][0]["labels"] == {"arch": "crate", "lr": "lr0.0005", "seed": "seed0"}
    assert manifest["runs"][-1]["labels"] == {"arch": "llama", "lr": "lr0.001", "seed": "seed2"}
    rerun = SeededFakeRuns()
    assert tune(path, rerun, log=lambda line: None) == record and rerun.ran == []
