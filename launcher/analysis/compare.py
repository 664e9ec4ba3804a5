"""``crate compare RUN_DIR... --out REPORT_DIR``: one markdown report, with PNG figures, comparing runs trained by
this harness (CRATE variants and their baselines, any sizes and seeds).

Each run directory is read through the run-directory contract (``config.yaml``, ``metrics.jsonl``, ``hf/``); a
sweep's ``output_root`` may be given instead of its runs (its ``sweep.json`` lists them and their labels). Runs are
grouped into **families**: the sweep's ``arch`` label when there is one, else the architecture (``crate`` /
``crate-lm`` / ``crate-alpha`` / ``tost`` for CRATE's variants, ``gpt2``, ``vit``, ``crate_vision``).

Figures: loss against tokens (train and eval); final eval loss against non-embedding parameters and against
training FLOPs, log-log, with a power law ``L = a x^-alpha`` fitted per family that has 3 or more distinct sizes
(``launcher.analysis.scaling``); throughput and memory; downstream accuracy where the runs evaluated a classifier; the
per-layer white-box curves (R^c, ΔR, ℓ0 non-zero fraction, Hoyer sparsity) of the last white-box step of every run
side by side. The summary table holds each run's numbers; with ``--lm-eval TASKS``, a table of each run's
lm-evaluation-harness scores on its export (``launcher.analysis.harness``, cached in the run directory). Training
FLOPs are the tokens trained times the FLOPs per token of the model (the architecture registry's formula,
``launcher.architectures.flops``: 6N plus attention, CRATE's own formulas; or the FLOPs the run counted on its first
step), as MFU uses.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from launcher.errors import InputError, MissingInputError
from launcher.metrics.logger import read_metrics


@dataclass
class RunSummary:
    """What the report needs of one run."""

    name: str
    path: Path
    family: str
    model_type: str
    task: str
    params: int | None = None
    non_embedding_params: int | None = None
    tokens: float | None = None  # trained (the last train row's count)
    flops: float | None = None
    steps: int | None = None
    train_loss: float | None = None  # mean of the last 3 logged losses
    eval: dict = field(default_factory=dict)  # the last eval row (loss, perplexity, accuracy, ...)
    tokens_per_s: float | None = None  # median over the logged steps
    samples_per_s: float | None = None
    mfu: float | None = None
    peak_memory_gib: float | None = None
    model_state_gib: float | None = None
    train_curve: list[tuple[float, float]] = field(default_factory=list)  # (tokens, loss)
    eval_curve: list[tuple[float, float]] = field(default_factory=list)
    whitebox: list[dict] = field(default_factory=list)  # per-layer rows of the last white-box step
    lm_eval: dict = field(default_factory=dict)  # lm-evaluation-harness scores of the export (crate compare --lm-eval)
    unigram_entropy: float | None = None  # nats/token of the eval tokens' own unigram distribution (causal LM)
    labels: dict = field(default_factory=dict)


def _median(values: list[float]) -> float | None:
    values = sorted(v for v in values if v is not None and math.isfinite(v))
    return values[len(values) // 2] if values else None


def _model_facts(run_dir: Path, config) -> tuple[str, str, int | None, float | None]:
    """(model_type, family, non-embedding parameters, training FLOPs per token) from the run's export."""
    import torch
    from transformers import AutoConfig

    from launcher.architectures.flops import frozen_flops_fraction, image_tokens
    from launcher.architectures.registry import architecture, training_flops_per_token
    from launcher.models.build import build_model

    export = run_dir / "hf"
    if not (export / "config.json").is_file():
        return config.model.arch, config.model.arch, None, None
    model_config = AutoConfig.from_pretrained(export)
    model_type = model_config.model_type
    entry = architecture(model_type)
    family = entry.family_of(model_config)
    with torch.device("meta"):
        model = build_model(model_config, config.task)
    seen, non_embedding = set(), 0
    for name, parameter in model.named_parameters():
        if id(parameter) not in seen and not entry.embedding_parameters.search(name):
            non_embedding += parameter.numel()
        seen.add(id(parameter))
    if config.task == "image-classification":
        per_token = training_flops_per_token(model_config, image_tokens(model_config))
    else:
        length = config.data.seq_len if config.task == "causal-lm" else config.data.max_length
        per_token = training_flops_per_token(model_config, length)
    if per_token is None:  # no formula: the FLOPs the run counted on its first step (already for the frozen share)
        counted = [
            row["flops_per_token"] for row in read_metrics(run_dir, kind="train") if row.get("event") == "flops_counted"
        ]
        return model_type, family, non_embedding, counted[-1] if counted else None
    return model_type, family, non_embedding, per_token * frozen_flops_fraction(config)


def unigram_entropy(run_dir: Path, config) -> float | None:
    """The entropy (nats/token) of the unigram distribution of the tokens the run evaluated on: the loss of the best
    model that ignores context, fitted to those very tokens, so a bar every trained LM should clear. None for a run
    that is not a causal LM, has no validation data, or whose tokenizer is not in the run directory (nor a path)."""
    import numpy as np

    from launcher.models.tokenizers import load_tokenizer, trained_tokenizer_dir
    from launcher.train.tasks import fixed_blocks, held_out_spec

    if config.task != "causal-lm" or not config.train.eval_every:
        return None
    held_out = held_out_spec(config)
    trained = trained_tokenizer_dir(run_dir) / "tokenizer.json"
    if held_out is None or (config.tokenizer.startswith("bpe:") and not trained.is_file()):
        return None
    tokenizer = load_tokenizer(config.tokenizer, output_dir=run_dir)
    start = next((row for row in read_metrics(run_dir, kind="train") if row.get("event") == "start"), {})
    world = start.get("world_size", 1)
    blocks = fixed_blocks(held_out, tokenizer, config.train.eval_batches * config.train.micro_batch_size * world)
    counts = np.bincount(blocks.flatten().numpy())
    probabilities = counts[counts > 0] / counts.sum()
    return float(-(probabilities * np.log(probabilities)).sum())


def summarize_run(run_dir: str | Path, labels: dict | None = None) -> RunSummary:
    """Read one run directory; a missing part (no export, no eval, no white-box rows) leaves its fields empty."""
    from launcher.config.run import load_run_config

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise MissingInputError(f"{run_dir}: not a run directory (no config.yaml)")
    config = load_run_config(run_dir / "config.yaml")
    model_type, family, non_embedding, flops_per_token = _model_facts(run_dir, config)
    train = read_metrics(run_dir, kind="train")
    evals = [row for row in read_metrics(run_dir, kind="eval") if "loss" in row]
    start = next((row for row in reversed(train) if row.get("event") == "start"), {})
    logged = [row for row in train if "loss" in row and "event" not in row]
    summary = RunSummary(
        name=run_dir.name,
        path=run_dir,
        family=(labels or {}).get("arch", family),
        model_type=model_type,
        task=config.task,
        labels=dict(labels or {}),
    )
    summary.params = start.get("params")
    summary.non_embedding_params = non_embedding
    if evals:
        summary.unigram_entropy = unigram_entropy(run_dir, config)
    if logged:
        last = logged[-1]
        summary.steps, summary.tokens = last["step"], last.get("tokens")
        summary.train_loss = sum(row["loss"] for row in logged[-3:]) / len(logged[-3:])
        summary.train_curve = [(row.get("tokens", row["step"]), row["loss"]) for row in logged]
        summary.tokens_per_s = _median([row.get("tokens_per_s") for row in logged[1:] or logged])
        summary.samples_per_s = _median([row.get("samples_per_s") for row in logged[1:] or logged])
        summary.mfu = _median([row.get("mfu") for row in logged[1:] or logged])
        memory = [row.get("mem_max_allocated_gib", row.get("mem_max_rss_gib")) for row in logged]
        summary.peak_memory_gib = max((m for m in memory if m is not None), default=None)
    tokens_per_step = start.get("tokens_per_step")
    if evals:
        summary.eval = {k: v for k, v in evals[-1].items() if k not in ("kind", "time")}
        summary.eval_curve = [
            (row["step"] * tokens_per_step if tokens_per_step else row["step"], row["loss"]) for row in evals
        ]
    if summary.tokens is not None and flops_per_token is not None:
        summary.flops = summary.tokens * flops_per_token
    state = [row for row in train if row.get("event") == "model_state"]
    if state:
        summary.model_state_gib = state[-1].get("max_model_state_gib")
    whitebox = read_metrics(run_dir, kind="whitebox")
    if whitebox:
        last_step = whitebox[-1]["step"]
        summary.whitebox = [row for row in whitebox if row["step"] == last_step]
    return summary


def collect_runs(paths: list[str | Path]) -> list[RunSummary]:
    """Run directories, or sweep roots (``sweep.json``) standing for their runs, in the order given."""
    runs = []
    for path in map(Path, paths):
        manifest = path / "sweep.json"
        if manifest.is_file() and not (path / "config.yaml").is_file():
            for run in json.loads(manifest.read_text())["runs"]:
                # as recorded (relative to where the sweep ran), else under the root as found (moved, or elsewhere)
                for directory in (Path(run["output_dir"]), path / Path(run["output_dir"]).name):
                    if (directory / "config.yaml").is_file():
                        runs.append(summarize_run(directory, run["labels"]))
                        break
            continue
        runs.append(summarize_run(path))
    if not runs:
        raise InputError("crate compare: no runs found in " + ", ".join(map(str, paths)))
    names = [run.name for run in runs]
    for run in runs:  # names must tell runs apart in legends and tables
        if names.count(run.name) > 1:
            run.name = f"{run.path.parent.name}/{run.name}"
    return runs


def best_over(runs: list[RunSummary], axes: list[str], seed_axis: str = "seed") -> tuple[list[RunSummary], list[dict]]:
    """Per group of runs that differ only in the sweep labels ``axes`` (a learning-rate axis, say), the run with the
    lowest final eval loss: a scaling comparison puts each size at its own best setting, not at one shared guess.
    Seed replicates (runs that differ only in ``seed_axis``) are one candidate, scored by their mean (by the mean of
    the seeds every candidate has, where candidates have different seeds: ``crate tune``'s replicates of its choice),
    and all of the chosen candidate's seeds are kept: each seed picking its own best would bias the comparison
    downwards.
    Returns the kept runs, in the order of their groups, and one tuning row per group (every candidate's eval loss
    and the choice). Runs without a sweep label for an axis, or groups without any eval loss, are refused."""
    groups: dict[tuple, dict[str, list[RunSummary]]] = {}
    for run in runs:
        missing = [axis for axis in axes if axis not in run.labels]
        if missing:
            known = ", ".join(run.labels) or "none: not from a sweep's output_root"
            raise InputError(
                f"crate compare --best-over {missing[0]}: run {run.name} has no label {missing[0]!r} "
                f"(its labels: {known})"
            )
        key = tuple((name, label) for name, label in run.labels.items() if name not in (*axes, seed_axis))
        candidate = "-".join(run.labels[axis] for axis in axes)
        groups.setdefault(key, {}).setdefault(candidate, []).append(run)
    kept, tuning = [], []
    for key, candidates in groups.items():
        group = "-".join(label for _, label in key) or "all"
        # Candidates with different seeds (a tuning's single runs beside the seed replicates of its choice) are
        # scored on the seeds they all have, so that the choice is the tuning's and not a replicate's luck.
        seed_sets = [{run.labels.get(seed_axis) for run in members} for members in candidates.values()]
        shared = set.intersection(*seed_sets) if len({frozenset(s) for s in seed_sets}) > 1 else None
        scores = {}
        for candidate, members in candidates.items():
            losses = [run.eval.get("loss") for run in members if not shared or run.labels.get(seed_axis) in shared]
            scores[candidate] = None if None in losses or not losses else sum(losses) / len(losses)
        scored = [candidate for candidate, score in scores.items() if score is not None]
        if not scored:
            raise InputError(f"crate compare --best-over: no run of group {group} has an eval loss")
        best = min(scored, key=scores.get)
        kept += candidates[best]
        tuning.append({"group": group, "chosen": ", ".join(run.name for run in candidates[best]), "candidates": scores})
    return kept, tuning


SEED_METRICS = (("loss", "eval loss", False), ("accuracy", "accuracy", True))  # (eval key, title, higher is better)


def compare_seeds(
    runs: list[RunSummary], seed_axis: str = "seed", reference: str | None = None, all_pairs: bool = False
) -> dict | None:
    """Seed replicates: runs grouped by every sweep label except ``seed_axis``; per group the mean ± std of the
    final eval loss (and accuracy, where every run has one) and n; with 2 or more groups, each group against the
    ``reference`` group (default: the lowest mean loss), or every pair, by Welch's t-test: the difference of means,
    its 95% confidence interval, t, df, p and the verdict. None when no run carries the seed label. A verdict needs
    2 or more seeds per group: a group with fewer is refused."""
    from launcher.analysis.statistics import difference_ci, mean_std, verdict, welch_t_test

    if not any(seed_axis in run.labels for run in runs):
        return None
    members: dict[str, list[RunSummary]] = {}
    for run in runs:
        if run.eval.get("loss") is None:
            raise InputError(f"crate compare: run {run.name} has no eval loss to average over seeds")
        group = "-".join(label for axis, label in run.labels.items() if axis != seed_axis) or "all"
        members.setdefault(group, []).append(run)
    metrics = [
        (key, title, higher)
        for key, title, higher in SEED_METRICS
        if all(run.eval.get(key) is not None for run in runs)
    ]
    values = {
        group: {key: [run.eval[key] for run in group_runs] for key, _, _ in metrics}
        for group, group_runs in members.items()
    }
    groups = [
        {
            "group": group,
            "n": len(group_runs),
            "runs": [run.name for run in group_runs],
            **{
                key: dict(zip(("mean", "std"), mean_std(values[group][key])), values=values[group][key])
                for key, _, _ in metrics
            },
        }
        for group, group_runs in members.items()
    ]
    result = {"seed_axis": seed_axis, "groups": groups, "reference": None, "comparisons": []}
    if len(groups) < 2:
        return result
    for row in groups:
        if row["n"] < 2:
            raise InputError(
                f"crate compare: group {row['group']} has {row['n']} seed ({', '.join(row['runs'])}); "
                "a verdict needs 2 or more seeds per group"
            )
    if reference is not None and reference not in members:
        raise InputError(f"crate compare --reference: no group {reference!r} (groups: {', '.join(members)})")
    if all_pairs:
        pairs = [(a, b) for index, a in enumerate(members) for b in list(members)[index + 1 :]]
    else:
        reference = reference or min(members, key=lambda group: sum(values[group]["loss"]) / len(members[group]))
        result["reference"] = reference
        pairs = [(group, reference) for group in members if group != reference]
    for key, title, higher in metrics:
        for a, b in pairs:
            t, df, p = welch_t_test(values[a][key], values[b][key])
            difference, low, high = difference_ci(values[a][key], values[b][key])
            result["comparisons"].append(
                {
                    "metric": title,
                    "a": a,
                    "b": b,
                    "difference": difference,
                    "ci95": [low, high],
                    "t": t,
                    "df": df,
                    "p": p,
                    "verdict": verdict(a, values[a][key], b, values[b][key], higher_is_better=higher),
                }
            )
    return result


# ----------------------------------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------------------------------


def _families(runs: list[RunSummary]) -> dict[str, list[RunSummary]]:
    grouped: dict[str, list[RunSummary]] = {}
    for run in runs:
        grouped.setdefault(run.family, []).append(run)
    return grouped


def _loss_curves(runs: list[RunSummary], path: Path) -> Path:
    from launcher.metrics.figures import pyplot, save_and_close

    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    families = _families(runs)
    # many runs of a few families (seeds, learning rates): a colour per family, labelled once
    by_family = len(families) < len(runs)
    seen = set()
    for run in runs:
        colour = f"C{list(families).index(run.family) % 10}" if by_family else None
        label = run.name if not by_family else (run.family if run.family not in seen else None)
        seen.add(run.family)
        if run.train_curve:
            tokens, losses = zip(*run.train_curve)
            axes[0].plot(tokens, losses, label=label, linewidth=1, color=colour, alpha=0.8 if by_family else 1)
        if run.eval_curve:
            tokens, losses = zip(*run.eval_curve)
            axes[1].plot(tokens, losses, marker="o", markersize=3, label=label, color=colour)
    for axis, title in zip(axes, ("train loss", "eval loss")):
        axis.set_xlabel("tokens" if runs[0].task == "causal-lm" else "tokens (patches x images)")
        axis.set_ylabel(title)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    return save_and_close(figure, path)


def _scaling_figure(
    runs: list[RunSummary], attribute: str, label: str, path: Path, fit: bool = True
) -> tuple[Path, dict]:
    """Final eval loss against ``attribute`` per family, log-log, and (``fit``) each family's power law where its
    points can carry one (``scaling.fittable``: 3+ sizes spanning 4x)."""
    from launcher.analysis.scaling import fit_power_law, fittable
    from launcher.metrics.figures import pyplot, save_and_close

    plt = pyplot()
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    figure, axis = plt.subplots(figsize=(5.5, 4))
    fits = {}
    for family, members in _families(runs).items():
        points = [
            (getattr(run, attribute), run.eval["loss"])
            for run in members
            if getattr(run, attribute) and run.eval.get("loss")
        ]
        if not points:
            continue
        xs, ys = zip(*points)
        dots = axis.scatter(xs, ys, label=family, s=18)
        if fit and fittable(xs):
            law = fit_power_law(xs, ys)
            fits[family] = law
            grid = [min(xs) * (max(xs) / min(xs)) ** (i / 50) for i in range(51)]
            axis.plot(
                grid, law(grid), color=dots.get_facecolor()[0], linewidth=1, label=f"{family}: α = {law.exponent:.3f}"
            )
    axis.set_xscale("log")
    axis.set_yscale("log")
    # losses span well under a decade: plain numbers on the y axis, and no crowded minor labels on either axis
    axis.yaxis.set_major_formatter(FormatStrFormatter("%.2f"))
    axis.yaxis.set_minor_formatter(FormatStrFormatter("%.2f"))
    axis.xaxis.set_minor_formatter(NullFormatter())
    axis.set_xlabel(label)
    axis.set_ylabel("final eval loss")
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=7)
    return save_and_close(figure, path), fits


def _bars(runs: list[RunSummary], panels: list[tuple[str, str]], path: Path) -> Path:
    """One bar panel per (attribute, title), a bar per run."""
    from launcher.metrics.figures import pyplot, save_and_close

    plt = pyplot()
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    names = [run.name for run in runs]
    palette = {family: f"C{index % 10}" for index, family in enumerate(_families(runs))}
    for axis, (attribute, title) in zip(axes[0], panels):
        values = [
            getattr(run, attribute) if not attribute.startswith("eval.") else run.eval.get(attribute[5:])
            for run in runs
        ]
        axis.bar(
            range(len(runs)), [v if v is not None else 0 for v in values], color=[palette[run.family] for run in runs]
        )
        axis.set_xticks(range(len(runs)), names, rotation=45, ha="right", fontsize=7)
        axis.set_title(title, fontsize=9)
        axis.grid(alpha=0.3, axis="y")
    return save_and_close(figure, path)


# ----------------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------------


def _number(value, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) >= 1e4):
        value = float(value)
        for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
            if abs(value) >= scale:
                return f"{value / scale:.3g}{unit}"
        return f"{value:.0f}"
    return f"{value:.{digits}g}"


def _seed_lines(seeds: dict) -> list[str]:
    """The report's seed section: each group's mean ± std and n, then each comparison and its verdict."""
    metrics = [(key, title) for key, title, _ in SEED_METRICS if key in seeds["groups"][0]]
    lines = [
        "",
        f"## Seeds: mean ± std over the `{seeds['seed_axis']}` axis",
        "",
        "| group | n | " + " | ".join(title for _, title in metrics) + " |",
        "|" + "---|" * (len(metrics) + 2),
    ]
    for row in seeds["groups"]:
        cells = [
            f"{row[key]['mean']:.4g} ± {row[key]['std']:.2g}"
            if row[key]["std"] is not None
            else _number(row[key]["mean"])
            for key, _ in metrics
        ]
        lines.append(f"| {row['group']} | {row['n']} | " + " | ".join(cells) + " |")
    if not seeds["comparisons"]:
        return lines
    against = f"each group against {seeds['reference']}" if seeds["reference"] else "every pair of groups"
    lines += [
        "",
        f"### Verdicts: {against}, Welch's t-test (two-sided), 95% confidence interval of A − B",
        "",
        "| metric | A | B | A − B | 95% CI | t | df | p | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in seeds["comparisons"]:
        low, high = row["ci95"]
        lines.append(
            f"| {row['metric']} | {row['a']} | {row['b']} | {row['difference']:+.4g} | [{low:+.4g}, {high:+.4g}] | "
            f"{row['t']:.3g} | {row['df']:.3g} | {row['p']:.2g} | {row['verdict']} |"
        )
    lines += [""] + [f"- {row['metric']}, {row['a']} vs {row['b']}: {row['verdict']}" for row in seeds["comparisons"]]
    return lines


def _lm_eval_group_lines(runs: list[RunSummary], seeds: dict) -> list[str]:
    """The lm-eval scores of seed groups: a column per group, mean ± std over its seeds (n as in the seed table)."""
    from launcher.analysis.statistics import mean_std

    by_name = {run.name: run for run in runs}
    groups = [(row["group"], [by_name[name] for name in row["runs"]]) for row in seeds["groups"]]
    rows = {}
    for run in runs:
        for task, metrics in run.lm_eval.get("tasks", {}).items():
            for metric in metrics:
                if not metric.endswith("_stderr"):
                    rows.setdefault((task, metric), None)
    lines = [
        "",
        f"### Downstream scores per group: mean ± std over the `{seeds['seed_axis']}` axis",
        "",
        "| task | metric | " + " | ".join(group for group, _ in groups) + " |",
        "|" + "---|" * (len(groups) + 2),
    ]
    for task, metric in rows:
        cells = []
        for _, members in groups:
            values = [m.lm_eval.get("tasks", {}).get(task, {}).get(metric) for m in members]
            values = [v for v in values if v is not None]
            mean, std = mean_std(values) if values else (None, None)
            cells.append("–" if mean is None else f"{mean:.4g}" + (f" ± {std:.2g}" if std is not None else ""))
        lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    return lines


def _lm_eval_lines(runs: list[RunSummary]) -> list[str]:
    """The report's lm-eval section: a row per task and metric, a column per run (value ± standard error)."""
    rows = {}
    for run in runs:
        for task, metrics in run.lm_eval.get("tasks", {}).items():
            for metric in metrics:
                if not metric.endswith("_stderr"):
                    rows.setdefault((task, metric), None)
    lines = [
        "",
        "## Downstream scores (lm-evaluation-harness)",
        "",
        "| task | metric | docs | " + " | ".join(run.name for run in runs) + " |",
        "|" + "---|" * (len(runs) + 3),
    ]
    for task, metric in rows:
        docs = {run.lm_eval.get("samples", {}).get(task) for run in runs} - {None}
        cells = []
        for run in runs:
            metrics = run.lm_eval.get("tasks", {}).get(task, {})
            value, stderr = metrics.get(metric), metrics.get(f"{metric}_stderr")
            cells.append(_number(value) + (f" ± {stderr:.2g}" if stderr is not None else ""))
        lines.append(f"| {task} | {metric} | {', '.join(map(str, sorted(docs))) or '–'} | " + " | ".join(cells) + " |")
    return lines


def _isoflop_lines(profiles: list, out: Path) -> tuple[list[str], str]:
    """The report's compute-matched section (``launcher.analysis.isoflop``) and its figure's file name; writes
    ``isoflop.json``."""
    from launcher.analysis.isoflop import equal_compute_verdicts, optimum_scaling, save_isoflop_figure

    verdicts = equal_compute_verdicts(profiles)
    scalings = [optimum_scaling([p for p in profiles if p.family == family]) for family in _ordered_families(profiles)]
    lines = [
        "",
        "## Compute-matched: IsoFLOP profiles (Chinchilla's approach 2)",
        "",
        "Per architecture and FLOP budget, a parabola of final eval loss in ln(non-embedding parameters); its "
        "minimum is the compute-optimal size N* and the loss L* it reaches.",
        "",
        "| family | budget | FLOPs | sizes (non-emb params) | mean losses | N* | L* | ± ln N* | residual sd | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in profiles:
        optimum = _number(int(p.optimum_params)) if p.optimum_params else "–"
        lines.append(
            f"| {p.family} | {p.budget} | {p.flops:.3g} | {', '.join(_number(int(n)) for n in p.sizes)} | "
            f"{', '.join(f'{loss:.4f}' for loss in p.losses)} | {optimum} | "
            f"{_number(p.optimum_loss)} | {_number(p.log_optimum_stderr, 2)} | {_number(p.residual_std, 2)} | "
            f"{p.note or '–'} |"
        )
    lines += [
        "",
        "At equal compute (each architecture at its fitted optimum size; ≤: not bracketed, its best measured loss):",
        "",
    ]
    for row in verdicts:
        ranking = ", then ".join(
            f"{r['family']} {'≤ ' if r['bound'] else ''}{r['optimum_loss']:.4f}"
            + (f" (+{r['gap']:.4f})" if r["gap"] else "")
            for r in row["ranking"]
        )
        lines.append(f"- {row['budget']} ({row['flops']:.3g} FLOPs): {ranking}")
    lines += [f"- {scaling.description}" for scaling in scalings if scaling is not None]
    figure = save_isoflop_figure(profiles, out / "isoflop.png")
    (out / "isoflop.json").write_text(
        json.dumps(
            {
                "profiles": [vars(p) for p in profiles],
                "equal_compute": verdicts,
                "optimum_scaling": [vars(s) for s in scalings if s is not None],
            },
            indent=1,
        )
    )
    return lines, figure.name


def _label_order(label: str) -> tuple:
    """Labels that end in a number (lr0.0005, lr0.001) in numeric order, then the others alphabetically."""
    match = re.search(r"(\d+(\.\d*)?(e-?\d+)?)$", label)
    return (0, label[: match.start()], float(match.group(1))) if match else (1, label, 0.0)


def _ordered_families(profiles: list) -> list[str]:
    return list(dict.fromkeys(p.family for p in profiles))


def write_report(
    runs: list[RunSummary],
    out_dir: str | Path,
    tuning: list[dict] | None = None,
    seeds: dict | None = None,
    budget_axis: str = "budget",
) -> Path:
    """Write ``report.md``, ``summary.json`` and the figures into ``out_dir``; returns the report's path. ``tuning``
    (from ``best_over``) adds the table of every candidate's eval loss and ``tuning.json``; ``seeds`` (from
    ``compare_seeds``) the seed section (spreads and verdicts) and ``seeds.json``. Runs labelled on ``budget_axis``
    (an IsoFLOP sweep) add the compute-matched section, its figure and ``isoflop.json``."""
    from launcher.analysis.isoflop import isoflop_profiles
    from launcher.metrics.figures import save_layer_curves

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures: list[tuple[str, str]] = [("Loss against tokens", _loss_curves(runs, out / "loss_vs_tokens.png").name)]
    profiles = isoflop_profiles(runs, budget_axis)
    fits = {}
    for attribute, label, file in (
        ("non_embedding_params", "non-embedding parameters", "loss_vs_params.png"),
        ("flops", "training FLOPs", "loss_vs_flops.png"),
    ):
        if any(getattr(run, attribute) and run.eval.get("loss") for run in runs):
            # An IsoFLOP grid's runs mix budgets and sizes: a law through all of them would mean nothing.
            path, fitted = _scaling_figure(runs, attribute, label, out / file, fit=not profiles)
            figures.append((f"Final eval loss against {label}", path.name))
            fits[label] = fitted
    speed = "samples_per_s" if runs[0].task == "image-classification" else "tokens_per_s"
    panels = [(speed, speed.replace("_per_s", "/s")), ("mfu", "MFU"), ("peak_memory_gib", "peak memory (GiB)")]
    figures.append(("Throughput and memory", _bars(runs, panels, out / "throughput_memory.png").name))
    if any("accuracy" in run.eval for run in runs):
        panels = [("eval.accuracy", "accuracy")] + (
            [("eval.macro_f1", "macro-F1")] if any("macro_f1" in run.eval for run in runs) else []
        )
        figures.append(("Downstream accuracy", _bars(runs, panels, out / "accuracy.png").name))
    if any(run.whitebox for run in runs):
        series = {run.name: run.whitebox for run in runs if run.whitebox}
        path = save_layer_curves(
            series,
            out / "whitebox_layers.png",
            ("rc", "delta_r", "sparsity_l0", "hoyer"),
            title="per-layer white-box measures at each run's last white-box step",
        )
        figures.append(("White-box measures per layer (R^c, ΔR, sparsity)", path.name))

    lines = [
        "# Comparison report",
        "",
        f"{len(runs)} runs: " + ", ".join(f"`{run.path}`" for run in runs),
        "",
        "## Summary",
        "",
    ]
    accuracy = any("accuracy" in run.eval for run in runs)
    unigram = any(run.unigram_entropy is not None for run in runs)
    header = (
        [
            "run",
            "family",
            "params",
            "non-emb params",
            "tokens",
            "train FLOPs",
            "steps",
            "train loss",
            "eval loss",
            "perplexity",
        ]
        + (["below unigram"] if unigram else [])
        + (["accuracy"] if accuracy else [])
        + [speed.replace("_per_s", "/s"), "MFU", "peak mem GiB"]
    )
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        row = [
            run.name,
            run.family,
            _number(run.params),
            _number(run.non_embedding_params),
            _number(run.tokens),
            _number(run.flops),
            _number(run.steps),
            _number(run.train_loss),
            _number(run.eval.get("loss")),
            _number(run.eval.get("perplexity")),
        ]
        if unigram:
            below = None
            if run.unigram_entropy is not None and run.eval.get("loss") is not None:
                below = run.unigram_entropy - run.eval["loss"]
            row.append(f"{below:.3f} (of {run.unigram_entropy:.3f})" if below is not None else "–")
        if accuracy:
            row.append(_number(run.eval.get("accuracy")))
        row += [_number(getattr(run, speed), 3), _number(run.mfu, 3), _number(run.peak_memory_gib, 3)]
        lines.append("| " + " | ".join(row) + " |")
    if any(run.lm_eval for run in runs):
        lines += _lm_eval_lines(runs)
        if seeds and len(seeds["groups"]) > 1:
            lines += _lm_eval_group_lines(runs, seeds)
    if seeds:
        lines += _seed_lines(seeds)
        (out / "seeds.json").write_text(json.dumps(seeds, indent=1))
    if tuning:
        values = sorted(dict.fromkeys(value for row in tuning for value in row["candidates"]), key=_label_order)
        lines += [
            "",
            "## Tuning: final eval loss of every candidate (the lowest of each row is kept above)",
            "",
            "| group | " + " | ".join(values) + " | kept |",
            "|" + "---|" * (len(values) + 2),
        ]
        for row in tuning:
            cells = [_number(row["candidates"].get(value)) for value in values]  # "–" where a value was not run
            lines.append(f"| {row['group']} | " + " | ".join(cells) + f" | {row['chosen']} |")
        (out / "tuning.json").write_text(json.dumps(tuning, indent=1))
    if profiles:
        isoflop, figure = _isoflop_lines(profiles, out)
        lines += isoflop
        figures.append(("IsoFLOP profiles: final eval loss against size at each FLOP budget", figure))
    if any(fits.values()):
        lines += [
            "",
            "## Power-law fits",
            "",
            "Per family with 3 or more sizes spanning at least 4x: `L = a x^-α` (least squares in log-log space; "
            "± the exponent's standard error).",
            "",
        ]
        for label, fitted in fits.items():
            for family, law in fitted.items():
                lines.append(f"- {family}, loss against {label}: {law.describe('x')}")
    if any(run.whitebox for run in runs):
        lines += [
            "",
            "## White-box measures, first and last layer",
            "",
            "| run | step | R^c first → last | non-zero fraction (ℓ0) first → last |",
            "|---|---|---|---|",
        ]
        for run in runs:
            if run.whitebox:
                first, last = run.whitebox[0], run.whitebox[-1]
                lines.append(
                    f"| {run.name} | {first['step']} | {first['rc']:.4g} → {last['rc']:.4g} | "
                    f"{first['sparsity_l0']:.3f} → {last['sparsity_l0']:.3f} |"
                )
    lines += ["", "## Figures", ""]
    for title, name in figures:
        lines += [f"### {title}", "", f"![{title}]({name})", ""]
    (out / "summary.json").write_text(
        json.dumps(
            [
                {
                    key: (str(value) if isinstance(value, Path) else value)
                    for key, value in vars(run).items()
                    if key not in ("train_curve", "eval_curve")
                }
                for run in runs
            ],
            indent=1,
        )
    )
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report
