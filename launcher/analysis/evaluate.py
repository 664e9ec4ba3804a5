"""``crate eval MODEL_DIR --data ...``: evaluate an HF checkpoint (ours or a baseline) on held-out data; JSON out.

* A **causal LM** on text: perplexity with a sliding window. The text (a file, or a built-in corpus's validation
  split) is tokenized as one stream, documents joined by EOS; windows of ``max_length`` tokens start every
  ``stride`` tokens, and each scores only the tokens no earlier window scored, with the rest of the window as
  context (HF's perplexity recipe). ``perplexity = exp(total NLL / scored tokens)``; with ``stride = max_length``
  the windows are disjoint.
* A **text classifier** on a labelled file (or ``rotten-tomatoes``): accuracy and macro-F1, the file's labels mapped
  through the model's ``id2label`` names.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from launcher.errors import InputError, MissingInputError


def read_evaluation_texts(data: str) -> list[str]:
    """Documents of a text file (one), a JSONL file (its ``text`` fields) or a built-in corpus's validation split."""
    path = Path(data)
    if path.is_file():
        if path.suffix == ".jsonl":
            return _jsonl_texts(path)
        return [path.read_text(encoding="utf-8")]
    from data_pipeline.builtin import BUILTIN_SOURCES, iter_documents

    if data not in BUILTIN_SOURCES:
        raise InputError(f"--data: {data!r} is neither a file nor a built-in corpus ({list(BUILTIN_SOURCES)})")
    return [document["text"] for document in iter_documents(data, "validation")]


def _jsonl_texts(path: Path) -> list[str]:
    """The ``text`` field of every record; a bad record is a one-line error naming the file and its line."""
    import json

    texts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as error:
            raise InputError(f"{path}:{number}: not valid JSON ({error})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise InputError(f"{path}:{number}: a record needs a string 'text' field")
        texts.append(record["text"])
    return texts


@torch.no_grad()
def perplexity(model, tokenizer, texts: list[str], max_length: int, stride: int, batch_size: int = 8) -> dict:
    if not 1 <= stride <= max_length:
        raise InputError(f"--stride must be in [1, --max-length={max_length}], got {stride}")
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    ids = ids[:-1]
    if len(ids) < 2:
        raise InputError("--data: fewer than 2 tokens to score")
    windows, scored_until = [], 0
    for begin in range(0, len(ids) - 1, stride):
        end = min(begin + max_length, len(ids))
        targets = end - max(begin + 1, scored_until)  # the first token of the text has no prediction
        if targets > 0:
            windows.append((begin, end, targets))
        scored_until = end
        if end == len(ids):
            break
    model.eval()
    total_nll, total_tokens = 0.0, 0
    for first in range(0, len(windows), batch_size):
        chunk = windows[first : first + batch_size]
        width = max(end - begin for begin, end, _ in chunk)
        input_ids = torch.full((len(chunk), width), tokenizer.eos_token_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (begin, end, targets) in enumerate(chunk):
            window = torch.tensor(ids[begin:end])
            input_ids[row, : len(window)] = window
            mask[row, : len(window)] = 1
            labels[row, len(window) - targets : len(window)] = window[len(window) - targets :]
        logits = model(input_ids=input_ids, attention_mask=mask).logits.float()
        shifted = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
        )
        total_nll += shifted.item()
        total_tokens += sum(targets for _, _, targets in chunk)
    loss = total_nll / total_tokens
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "tokens": total_tokens,
        "windows": len(windows),
        "max_length": max_length,
        "stride": stride,
    }


@torch.no_grad()
def classification(model, tokenizer, data: str, max_length: int, batch_size: int = 32) -> dict:
    from data_pipeline.labelled import pad_batch, parse_labelled_text, read_labelled
    from launcher.metrics.classification import macro_f1

    names = tuple(model.config.id2label[i] for i in range(model.config.num_labels))
    source = data if data != "rotten-tomatoes" else {"builtin": data, "split": "test"}
    examples = read_labelled(parse_labelled_text({"sources": [source], "max_length": max_length}), names)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    encoded = tokenizer(examples.texts, truncation=True, max_length=max_length)["input_ids"]
    model.eval()
    confusion = np.zeros((len(names), len(names)))
    for first in range(0, len(encoded), batch_size):
        batch = pad_batch(
            encoded[first : first + batch_size], examples.labels[first : first + batch_size], tokenizer.pad_token_id
        )
        predictions = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1)
        for truth, guess in zip(batch["labels"].tolist(), predictions.tolist()):
            confusion[truth, guess] += 1
    return {
        "accuracy": float(np.trace(confusion) / confusion.sum()),
        "macro_f1": macro_f1(confusion),
        "examples": len(encoded),
        "bad_records": examples.bad,
        "labels": list(names),
    }


def evaluate_checkpoint(
    model_dir: str, data: str, max_length: int | None = None, stride: int | None = None, batch_size: int = 8
) -> dict:
    """``crate eval``: the right measure for the checkpoint's head (causal LM or sequence classifier)."""
    if not (Path(model_dir) / "config.json").is_file():
        raise MissingInputError(f"{model_dir}: no config.json (export a run first: crate export RUN_DIR)")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    import crate_lm  # noqa: F401  (registers the CRATE classes)

    config = AutoConfig.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    positions = getattr(config, "max_position_embeddings", 1024)
    max_length = max_length or positions
    if max_length > positions:
        raise InputError(f"--max-length {max_length} exceeds the model's max_position_embeddings ({positions})")
    architecture = (config.architectures or [""])[0]
    if architecture.endswith("ForSequenceClassification"):
        model = AutoModelForSequenceClassification.from_pretrained(model_dir)
        return {"model": model_dir, "data": data, **classification(model, tokenizer, data, max_length)}
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return {
        "model": model_dir,
        "data": data,
        **perplexity(model, tokenizer, read_evaluation_texts(data), max_length, stride or max_length // 2, batch_size),
    }
