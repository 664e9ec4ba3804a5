"""The shipped offline tasks' ``custom_dataset`` functions: documents built from the project's held-out data
(``launcher.analysis.harness``; lm-eval passes the task's ``metadata`` and ``dataset_kwargs`` as keywords)."""

from launcher.analysis.harness import task_dataset


def perplexity_passages(corpus: str, **_) -> dict:
    return task_dataset(f"ppl-{corpus}")


def continuations(**_) -> dict:
    return task_dataset("continuation")


def rotten_tomatoes(**_) -> dict:
    return task_dataset("rotten-tomatoes")
