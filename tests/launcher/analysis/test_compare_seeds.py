"""``crate compare`` on seed replicates, from tiny synthetic run directories (a run config and a metrics.jsonl, no
training): each group's mean ± std and n, the verdicts of Welch's test against the best group or a chosen reference,
``--best-over`` choosing by the mean over seeds, and the one-line refusal of a group with a single seed."""

from __future__ import annotations

import json
import shutil

import pytest

from launcher.analysis.statistics import welch_t_test
from launcher.cli import main
from tests.crate_cli import REPO

# final eval losses per group: crate clearly lower than gpt2; llama within crate's noise
LOSSES = {"crate": [4.00, 4.02, 4.01], "gpt2": [4.30, 4.33, 4.31], "llama": [4.03, 3.97, 4.05]}


def fake_run(run_dir, eval_loss: float, accuracy: float | None = None) -> None:
    """A run directory as the loop leaves it, without the export: its config and a few metrics rows."""
    run_dir.mkdir(parents=True)
    shutil.copy(REPO / "configs" / "lm" / "crate-tiny.yaml", run_dir / "config.yaml")
    rows = [
        {"kind": "train", "event": "start", "params": 1000, "tokens_per_step": 64},
        *({"kind": "train", "step": step, "loss": eval_loss + 1 / step, "tokens": 64 * step} for step in (1, 2, 3)),
        {"kind": "eval", "step": 3, "loss": eval_loss, **({"accuracy": accuracy} if accuracy is not None else {})},
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def fake_sweep(root, losses: dict[str, list[float]], extra: dict | None = None) -> None:
    """A sweep root: runs labelled arch x seed (and the labels of ``extra``), and its sweep.json."""
    runs = []
    for arch, values in losses.items():
        for seed, loss in enumerate(values):
            labels = {"arch": arch, **(extra or {}), "seed": f"seed{seed}"}
            name = "-".join(labels.values())
            fake_run(root / name, loss)
            runs.append({"name": name, "labels": labels, "output_dir": str(root / name)})
    root.mkdir(exist_ok=True)
    (root / "sweep.json").write_text(json.dumps({"name": "seeds", "command": "pretrain", "runs": runs}))


def test_compare_reports_spreads_and_verdicts_against_the_best_group(tmp_path, capsys):
    fake_sweep(tmp_path / "sweep", LOSSES)
    assert main(["compare", str(tmp_path / "sweep"), "--out", str(tmp_path / "report")]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Seeds: mean ± std over the `seed` axis" in report
    assert "| crate | 3 | 4.01 ± 0.01 |" in report and "| gpt2 | 3 | 4.313 ± 0.015 |" in report
    p_gpt2 = welch_t_test(LOSSES["gpt2"], LOSSES["crate"])[2]
    p_llama = welch_t_test(LOSSES["llama"], LOSSES["crate"])[2]
    assert p_gpt2 < 0.05 < p_llama
    assert f"- eval loss, gpt2 vs crate: crate beats gpt2 (p = {p_gpt2:.2g})" in report
    assert f"- eval loss, llama vs crate: no significant difference (p = {p_llama:.2g})" in report
    assert "each group against crate" in report and "crate beats gpt2" in capsys.readouterr().out
    seeds = json.loads((tmp_path / "report" / "seeds.json").read_text())
    assert seeds["reference"] == "crate" and [row["n"] for row in seeds["groups"]] == [3, 3, 3]
    gpt2 = next(row for row in seeds["comparisons"] if row["a"] == "gpt2")
    low, high = gpt2["ci95"]
    assert gpt2["difference"] == pytest.approx(4.31333 - 4.01, abs=1e-4) and 0 < low < gpt2["difference"] < high


def test_a_chosen_reference_and_every_pair(tmp_path):
    fake_sweep(tmp_path / "sweep", LOSSES)
    assert main(["compare", str(tmp_path / "sweep"), "--reference", "gpt2", "--out", str(tmp_path / "r1")]) == 0
    seeds = json.loads((tmp_path / "r1" / "seeds.json").read_text())
    assert [(row["a"], row["b"]) for row in seeds["comparisons"]] == [("crate", "gpt2"), ("llama", "gpt2")]
    assert main(["compare", str(tmp_path / "sweep"), "--all-pairs", "--out", str(tmp_path / "r2")]) == 0
    seeds = json.loads((tmp_path / "r2" / "seeds.json").read_text())
    pairs = [(row["a"], row["b"]) for row in seeds["comparisons"]]
    assert pairs == [("crate", "gpt2"), ("crate", "llama"), ("gpt2", "llama")] and seeds["reference"] is None


def test_best_over_chooses_by_the_mean_over_seeds_and_keeps_every_seed(tmp_path):
    # lr1: mean 4.1 but one lucky seed at 3.9; lr2: mean 4.0, so lr2 is chosen with both of its seeds
    root = tmp_path / "sweep"
    fake_sweep(root / "a", {"crate": [3.9, 4.3]}, extra={"lr": "lr1"})
    fake_sweep(root / "b", {"crate": [4.0, 4.0]}, extra={"lr": "lr2"})
    out = tmp_path / "report"
    assert main(["compare", str(root / "a"), str(root / "b"), "--best-over", "lr", "--out", str(out)]) == 0
    tuning = json.loads((out / "tuning.json").read_text())
    assert tuning == [
        {"group": "crate", "chosen": "crate-lr2-seed0, crate-lr2-seed1", "candidates": {"lr1": 4.1, "lr2": 4.0}}
    ]
    assert [run["name"] for run in json.loads((out / "summary.json").read_text())] == [
        "crate-lr2-seed0",
        "crate-lr2-seed1",
    ]


def test_best_over_scores_candidates_on_their_shared_seeds(tmp_path):
    """crate tune's layout: single runs (seed0) at every lr, replicates only of the chosen one. The choice is made on
    seed0 (where lr2 wins), not on lr2's mean that its unlucky replicates raise above lr1's single run; every seed of
    lr2 is kept."""
    root = tmp_path / "sweep"
    fake_sweep(root / "a", {"crate": [4.05]}, extra={"lr": "lr1"})
    fake_sweep(root / "b", {"crate": [4.0, 4.2, 4.2]}, extra={"lr": "lr2"})
    out = tmp_path / "report"
    assert main(["compare", str(root / "a"), str(root / "b"), "--best-over", "lr", "--out", str(out)]) == 0
    tuning = json.loads((out / "tuning.json").read_text())
    assert tuning[0]["candidates"] == {"lr1": 4.05, "lr2": 4.0}
    assert [run["name"] for run in json.loads((out / "summary.json").read_text())] == [
        "crate-lr2-seed0",
        "crate-lr2-seed1",
        "crate-lr2-seed2",
    ]


def test_a_group_with_one_seed_is_refused_in_one_line(tmp_path, capsys):
    fake_sweep(tmp_path / "sweep", {"crate": [4.0, 4.1], "gpt2": [4.3]})
    assert main(["compare", str(tmp_path / "sweep"), "--out", str(tmp_path / "report")]) == 2
    assert capsys.readouterr().err == (
        "crate compare: error: crate compare: group gpt2 has 1 seed (gpt2-seed0); "
        "a verdict needs 2 or more seeds per group\n"
    )
    assert main(["compare", str(tmp_path / "sweep"), "--reference", "vit", "--out", str(tmp_path / "r")]) == 2


def test_a_sweep_root_moved_or_read_from_elsewhere_still_finds_its_runs(tmp_path):
    from launcher.analysis.compare import collect_runs

    fake_sweep(tmp_path / "sweep", {"crate": [4.0, 4.1]})
    moved = tmp_path / "elsewhere" / "sweep"
    moved.parent.mkdir()
    (tmp_path / "sweep").rename(moved)  # sweep.json still names the old directories
    runs = collect_runs([moved])
    assert [run.labels["seed"] for run in runs] == ["seed0", "seed1"] and all(run.path.parent == moved for run in runs)


def test_a_reference_without_seed_groups_is_refused(tmp_path, capsys):
    fake_run(tmp_path / "one", 4.0)
    assert main(["compare", str(tmp_path / "one"), "--reference", "crate", "--out", str(tmp_path / "r")]) == 2
    assert "needs 2 or more groups of runs that differ only in the 'seed' label" in capsys.readouterr().err


def test_image_runs_get_accuracy_spreads_and_verdicts_where_higher_is_better(tmp_path):
    from launcher.analysis.compare import collect_runs, compare_seeds

    accuracies = {"crate": [0.80, 0.81, 0.82], "vit": [0.70, 0.71, 0.69]}
    for arch, values in accuracies.items():
        for seed, accuracy in enumerate(values):
            fake_run(tmp_path / f"{arch}-seed{seed}", 1.0 - accuracy, accuracy)
    runs = collect_runs(sorted(tmp_path.iterdir()))
    for run in runs:  # labels as a sweep would give them
        run.labels = dict(zip(("arch", "seed"), run.name.split("-")))
    seeds = compare_seeds(runs)
    crate = seeds["groups"][0]
    assert crate["accuracy"]["mean"] == pytest.approx(0.81) and crate["accuracy"]["std"] == pytest.approx(0.01)
    verdicts = {row["metric"]: row["verdict"] for row in seeds["comparisons"]}
    assert verdicts["accuracy"].startswith("crate beats vit") and verdicts["eval loss"].startswith("crate beats vit")


def test_lm_eval_scores_are_averaged_per_seed_group(tmp_path):
    """With seed groups the report also gives each group's lm-eval scores as mean ± std over its seeds."""
    from launcher.analysis.compare import collect_runs, compare_seeds, write_report

    fake_sweep(tmp_path / "sweep", {"crate": LOSSES["crate"], "gpt2": LOSSES["gpt2"]})
    runs = collect_runs([tmp_path / "sweep"])
    accuracy = {"crate": [0.50, 0.52, 0.54], "gpt2": [0.60, 0.60, 0.60]}
    for run in runs:
        seed = int(run.labels["seed"][4:])
        run.lm_eval = {"tasks": {"crate_continuation": {"acc": accuracy[run.labels["arch"]][seed], "acc_stderr": 0.01}}}
    report = write_report(runs, tmp_path / "report", seeds=compare_seeds(runs)).read_text()
    assert "| crate_continuation | acc | 0.52 ± 0.02 | 0.6 ± 0 |" in report
