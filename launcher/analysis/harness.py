"""Downstream scores through EleutherAI's lm-evaluation-harness (``lm-eval``, the optional extra ``crate[eval]``).

``crate eval MODEL --lm-eval TASKS`` and ``crate compare RUN... --lm-eval TASKS`` run lm-eval tasks on an HF export
with lm-eval's ``hf`` model (``pretrained=DIR,trust_remote_code=True``, on the CPU). Any lm-eval task directory is
accepted (``--lm-eval-include DIR``); stock tasks download their data from the HF hub, so this project ships small
**offline** tasks (``lm_eval_tasks/``, names ``crate_*``) whose documents are built here from the project's own
held-out data, deterministically (seed 0, capped sizes: seconds on a tiny model), into
``<cache>/lm-eval/v<TASK_DATA_VERSION>/<name>.jsonl`` on first use (``data_pipeline.fetch.cache_dir``):

* ``ppl-<corpus>`` (tasks ``crate_ppl_<corpus>``, loglikelihood_rolling: word/byte perplexity, bits per byte): 8
  passages of about 1,000 characters drawn from the validation split of each built-in corpus (cut at blank space).
* ``continuation`` (``crate_continuation``, multiple choice: acc, acc_norm): 25 spans of 18 words per corpus; the
  first 12 words are the context, the true last 6 words are one of 4 choices, the 3 others are the last 6 words of
  other spans of the same corpus' validation split.
* ``rotten-tomatoes`` (``crate_rotten_tomatoes``, zero-shot sentiment, acc, acc_norm): 100 fresh and 100 rotten
  reviews of the test split (split by movie), choices ``negative`` / ``positive``.

Results are reduced to ``{task: {metric: value, metric_stderr: value}}`` plus the documents scored per task.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from launcher.errors import InputError, MissingInputError

SHIPPED_TASKS_DIR = Path(__file__).with_name("lm_eval_tasks")
TASK_DATA_VERSION = 1
SEED = 0
PASSAGES_PER_CORPUS, PASSAGE_CHARS = 8, 1000
SPANS_PER_CORPUS, CONTEXT_WORDS, ENDING_WORDS, CHOICES = 25, 12, 6, 4
REVIEWS_PER_CLASS = 100
DEFAULT_BOOTSTRAP_ITERS = 1000  # lm-eval's default 100,000 resamples (for metrics such as BLEU) take minutes on a CPU


def require_lm_eval() -> None:
    """A one-line error naming the extra when lm-eval is not installed."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise InputError("--lm-eval needs EleutherAI's lm-evaluation-harness: pip install 'crate[eval]'") from None


# ----------------------------------------------------------------------------------------------------------------------
# The shipped tasks' documents
# ----------------------------------------------------------------------------------------------------------------------


def _passages(text: str, size: int) -> list[str]:
    """``text`` cut into pieces of at most ``size`` characters at blank space; short tails are dropped."""
    pieces, start = [], 0
    while start < len(text):
        end = min(start + size, len(text))
        if end < len(text):
            cut = max(text.rfind(" ", start, end), text.rfind("\n", start, end))
            end = cut if cut > start else end
        piece = text[start:end].strip()
        if len(piece) >= size // 2:
            pieces.append(piece)
        start = end
    return pieces


def _validation_texts(corpus: str) -> list[str]:
    from data_pipeline.builtin import ensure_prepared, iter_documents

    ensure_prepared(corpus)
    return [document["text"] for document in iter_documents(corpus, "validation")]


def _perplexity_docs(corpus: str) -> list[dict]:
    pool = [piece for text in _validation_texts(corpus) for piece in _passages(text, PASSAGE_CHARS)]
    chosen = sorted(random.Random(SEED).sample(range(len(pool)), min(PASSAGES_PER_CORPUS, len(pool))))
    return [{"text": pool[index], "corpus": corpus} for index in chosen]


def _continuation_docs() -> list[dict]:
    from data_pipeline.builtin import BUILTIN_SOURCES

    rng, docs = random.Random(SEED), []
    width = CONTEXT_WORDS + ENDING_WORDS
    for corpus in BUILTIN_SOURCES:
        spans = []
        for text in _validation_texts(corpus):
            words = text.split()
            spans += [words[begin : begin + width] for begin in range(0, len(words) - width + 1, width)]
        for index in sorted(rng.sample(range(len(spans)), min(SPANS_PER_CORPUS, len(spans)))):
            truth = " ".join(spans[index][CONTEXT_WORDS:])
            endings = [truth]
            while len(endings) < CHOICES:  # distinct endings of other spans of the same corpus
                other = " ".join(spans[rng.randrange(len(spans))][CONTEXT_WORDS:])
                if other not in endings:
                    endings.append(other)
            rng.shuffle(endings)
            context = " ".join(spans[index][:CONTEXT_WORDS])
            docs.append({"context": context, "choices": endings, "label": endings.index(truth), "corpus": corpus})
    return docs


def _rotten_tomatoes_docs() -> list[dict]:
    from data_pipeline.labelled import rotten_tomatoes

    rows = rotten_tomatoes("test")
    rng, chosen = random.Random(SEED), []
    for label in (0, 1):
        indices = [index for index, row in enumerate(rows) if row["label"] == label]
        chosen += rng.sample(indices, min(REVIEWS_PER_CLASS, len(indices)))
    return [{"text": rows[i]["text"], "label": rows[i]["label"], "movie": rows[i]["movie"]} for i in sorted(chosen)]


def task_data_names() -> list[str]:
    from data_pipeline.builtin import BUILTIN_SOURCES

    return [f"ppl-{corpus}" for corpus in BUILTIN_SOURCES] + ["continuation", "rotten-tomatoes"]


def task_data_file(name: str) -> Path:
    """The JSONL file of a shipped task's documents, built from the offline data on first use (atomically)."""
    from data_pipeline.fetch import cache_dir
    from data_pipeline.files import atomic_write

    if name not in task_data_names():
        raise InputError(f"lm-eval task data {name!r} is not one of {task_data_names()}")
    path = cache_dir() / "lm-eval" / f"v{TASK_DATA_VERSION}" / f"{name}.jsonl"
    if not path.is_file():
        if name.startswith("ppl-"):
            docs = _perplexity_docs(name[len("ppl-") :])
        else:
            docs = _continuation_docs() if name == "continuation" else _rotten_tomatoes_docs()
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, "".join(json.dumps(doc, ensure_ascii=False) + "\n" for doc in docs))
    return path


def task_dataset(name: str) -> dict:
    """What a shipped task's ``custom_dataset`` returns: ``{"test": datasets.Dataset}`` of the task's documents."""
    import datasets

    lines = task_data_file(name).read_text(encoding="utf-8").splitlines()
    return {"test": datasets.Dataset.from_list([json.loads(line) for line in lines])}


# ----------------------------------------------------------------------------------------------------------------------
# Running lm-eval
# ----------------------------------------------------------------------------------------------------------------------


def parse_tasks(text: str) -> list[str]:
    """``--lm-eval a,b``: the task (or group) names, in order, without repeats."""
    tasks = list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    if not tasks:
        raise InputError("--lm-eval: no task names (give a comma-separated list, e.g. crate_ppl_shakespeare)")
    return tasks


def shipped_tasks() -> list[str]:
    return sorted(path.stem for path in SHIPPED_TASKS_DIR.glob("crate_*.yaml"))


def task_manager(tasks: list[str], include: list[str | Path] = ()):
    """lm-eval's TaskManager over the shipped tasks and the ``include`` directories; lm-eval's own (thousands,
    ~15 s to index) only when a task is found in neither. An unknown task is a one-line error."""
    from lm_eval.tasks import TaskManager

    for directory in include:
        if not Path(directory).is_dir():
            raise MissingInputError(f"--lm-eval-include {directory}: no such directory")
    paths = [str(SHIPPED_TASKS_DIR), *map(str, include)]
    manager = TaskManager(include_path=paths, include_defaults=False)
    if any(not manager.match_tasks([task]) for task in tasks):
        manager = TaskManager(include_path=paths, include_defaults=True)
    unknown = [task for task in tasks if not manager.match_tasks([task])]
    if unknown:
        raise InputError(
            f"--lm-eval: unknown lm-eval task {unknown[0]!r} (shipped: {', '.join(shipped_tasks())}; "
            "a task directory of your own: --lm-eval-include DIR)"
        )
    return manager


def _number(value):
    return value if isinstance(value, int | float) else None  # lm-eval writes "N/A" for a missing stderr


def reduce_results(results: dict) -> dict:
    """lm-eval's result dict -> ``{"tasks": {task: {metric: value, metric_stderr: value}}, "samples": {task: n}}``
    (the ``,none`` filter suffix dropped; groups included where lm-eval aggregated them)."""
    tasks = {}
    for section in ("results", "groups"):
        for task, metrics in (results.get(section) or {}).items():
            row = {}
            for key, value in metrics.items():
                metric, _, flt = key.partition(",")
                if metric == "alias" or not flt:
                    continue
                row[metric if flt == "none" else f"{metric},{flt}"] = _number(value)
            if row:  # a group without an aggregate has no metrics of its own: its tasks are listed
                tasks[task] = row
    samples = {task: counts.get("effective") for task, counts in (results.get("n-samples") or {}).items()}
    return {"tasks": tasks, "samples": samples, "versions": dict(results.get("versions") or {})}


def run_lm_eval(
    model_dir: str | Path,
    tasks: list[str],
    include: list[str | Path] = (),
    limit: float | None = None,
    batch_size: int = 8,
    bootstrap_iters: int = DEFAULT_BOOTSTRAP_ITERS,
) -> dict:
    """Run lm-eval's ``hf`` model on ``model_dir`` (CPU) over ``tasks``; the reduced scores (``reduce_results``)."""
    require_lm_eval()
    if not (Path(model_dir) / "config.json").is_file():
        raise MissingInputError(f"{model_dir}: no config.json (export a run first: crate export RUN_DIR)")
    import lm_eval

    import crate_lm  # noqa: F401  (registers the CRATE classes: exports load with or without their remote code)

    manager = task_manager(tasks, include)
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(model_dir), "trust_remote_code": True},
        tasks=tasks,
        device="cpu",
        batch_size=batch_size,
        limit=limit,
        task_manager=manager,
        log_samples=False,
        bootstrap_iters=bootstrap_iters,
    )
    return {
        "model": str(model_dir),
        "lm_eval_version": getattr(lm_eval, "__version__", None),
        "limit": limit,
        **reduce_results(results),
    }


def _export_fingerprint(export: Path) -> list:
    """Names, sizes and modification times of the export's files: a new export invalidates the cache."""
    return sorted(
        (path.name, path.stat().st_size, path.stat().st_mtime_ns) for path in export.iterdir() if path.is_file()
    )


def cached_lm_eval(
    run_dir: str | Path,
    tasks: list[str],
    include: list[str | Path] = (),
    limit: float | None = None,
    batch_size: int = 8,
) -> dict:
    """``run_lm_eval`` on a run's ``hf`` export, cached in ``RUN_DIR/lm_eval/<key>.json`` (the key: the tasks, the
    include directories and the limit; the export's fingerprint is checked), so a rerun of a report is free."""
    from data_pipeline.files import atomic_write

    run_dir = Path(run_dir)
    export = run_dir / "hf"
    if not (export / "config.json").is_file():
        raise MissingInputError(f"crate compare --lm-eval: {run_dir} has no hf/ export (crate export {run_dir})")
    request = {"tasks": tasks, "include": [str(Path(p).resolve()) for p in include], "limit": limit}
    key = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()[:16]
    path = run_dir / "lm_eval" / f"{key}.json"
    fingerprint = json.loads(json.dumps(_export_fingerprint(export)))
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("request") == request and cached.get("export") == fingerprint:
            return cached["result"]
    result = run_lm_eval(export, tasks, include, limit, batch_size)
    path.parent.mkdir(exist_ok=True)
    atomic_write(path, json.dumps({"request": request, "export": fingerprint, "result": result}, indent=1) + "\n")
    return result
