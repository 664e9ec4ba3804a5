"""`crate eval`: perplexity with a sliding window equals exp(mean token loss) computed by hand; classifier metrics."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from crate_lm import CrateForCausalLM, config_from_preset
from crate_lm.tokenization import gpt2_tokenizer_from_tiktoken
from data_pipeline.fetch import fetch_gpt2_ranks
from launcher.analysis.evaluate import evaluate_checkpoint, perplexity

REPO = Path(__file__).resolve().parents[3]
TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity. "
) * 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lm")
    tokenizer = gpt2_tokenizer_from_tiktoken(fetch_gpt2_ranks())
    torch.manual_seed(0)
    model = CrateForCausalLM(
        config_from_preset(
            "crate-test", vocab_size=len(tokenizer), bos_token_id=50256, eos_token_id=50256, max_position_embeddings=64
        )
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def hand_loss(model, ids: list[int], window: int) -> float:
    """Mean next-token loss over disjoint windows, each scored on its own (labels = inputs)."""
    total, count = 0.0, 0
    for begin in range(0, len(ids), window):
        chunk = torch.tensor([ids[begin : begin + window]])
        if chunk.shape[1] < 2:
            continue
        with torch.no_grad():
            total += model(input_ids=chunk, labels=chunk).loss.item() * (chunk.shape[1] - 1)
        count += chunk.shape[1] - 1
    return total / count


def test_disjoint_windows_equal_exp_of_the_hand_computed_mean_loss(model_dir, tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    result = evaluate_checkpoint(str(model_dir), str(path), max_length=32, stride=32)
    model = CrateForCausalLM.from_pretrained(model_dir)
    tokenizer = gpt2_tokenizer_from_tiktoken(fetch_gpt2_ranks())
    ids = tokenizer(TEXT)["input_ids"]
    expected = hand_loss(model, ids, 32)
    assert result["loss"] == pytest.approx(expected, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert result["tokens"] == len(ids) - math.ceil(len(ids) / 32)  # each window's first token has no context


def test_overlapping_windows_score_every_token_once_with_more_context(model_dir, tmp_path):
    model = CrateForCausalLM.from_pretrained(model_dir)
    tokenizer = gpt2_tokenizer_from_tiktoken(fetch_gpt2_ranks())
    ids = tokenizer(TEXT)["input_ids"]
    full = perplexity(model, tokenizer, [TEXT], max_length=64, stride=64)
    sliding = perplexity(model, tokenizer, [TEXT], max_length=64, stride=16)
    assert sliding["tokens"] == len(ids) - 1
    # With a window as long as the text, one window scores everything: the plain mean token loss.
    whole = perplexity(model, tokenizer, [TEXT[:150]], max_length=64, stride=64)
    short = torch.tensor([tokenizer(TEXT[:150])["input_ids"]])
    with torch.no_grad():
        assert whole["loss"] == pytest.approx(model(input_ids=short, labels=short).loss.item(), rel=1e-5)
    assert sliding["windows"] > full["windows"]
    with pytest.raises(ValueError, match="--stride must be in"):
        perplexity(model, tokenizer, [TEXT], max_length=64, stride=65)


def test_crate_eval_cli_writes_json(model_dir, tmp_path):
    path = tmp_path / "text.jsonl"
    path.write_text("\n".join(json.dumps({"text": TEXT[i : i + 120]}) for i in range(0, 480, 120)))
    out = tmp_path / "result.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "launcher.cli",
            "eval",
            str(model_dir),
            "--data",
            str(path),
            "--max-length",
            "64",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    saved = json.loads(out.read_text())
    assert saved["stride"] == 32 and saved["perplexity"] == pytest.approx(math.exp(saved["loss"]))
    bad = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "eval", str(model_dir), "--data", "nowhere"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert bad.returncode == 2 and "is neither a file nor a built-in corpus" in bad.stderr


def test_classifier_accuracy_and_macro_f1_on_a_labelled_file(tmp_path):
    from crate_lm import CrateForSequenceClassification
    from launcher.metrics.classification import macro_f1

    tokenizer = gpt2_tokenizer_from_tiktoken(fetch_gpt2_ranks())
    torch.manual_seed(0)
    config = config_from_preset(
        "crate-test",
        vocab_size=len(tokenizer),
        bos_token_id=50256,
        eos_token_id=50256,
        pad_token_id=50256,
        num_labels=2,
        id2label={0: "neg", 1: "pos"},
        label2id={"neg": 0, "pos": 1},
    )
    model = CrateForSequenceClassification(config).eval()
    model.save_pretrained(tmp_path / "clf")
    tokenizer.save_pretrained(tmp_path / "clf")
    rows = [
        ("a fine film", "pos"),
        ("dreadful", "neg"),
        ("not bad at all", "pos"),
        ("boring and long", "neg"),
        ("superb", "pos"),
        ("a mess", "neg"),
    ]
    (tmp_path / "dev.csv").write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    result = evaluate_checkpoint(str(tmp_path / "clf"), str(tmp_path / "dev.csv"), max_length=16)
    import numpy as np

    confusion = np.zeros((2, 2))
    for text, label in rows:  # one example at a time, no padding: the same predictions as the padded batch
        with torch.no_grad():
            guess = int(model(input_ids=torch.tensor([tokenizer(text)["input_ids"]])).logits.argmax(-1))
        confusion[["neg", "pos"].index(label), guess] += 1
    assert result["examples"] == 6 and result["labels"] == ["neg", "pos"]
    assert result["accuracy"] == pytest.approx(np.trace(confusion) / 6)
    assert result["macro_f1"] == pytest.approx(macro_f1(confusion))


def test_a_bad_jsonl_record_names_the_file_and_its_line(tmp_path):
    from launcher.analysis.evaluate import read_evaluation_texts
    from launcher.errors import InputError

    path = tmp_path / "held-out.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "two"}\n{"text": oops}\n')
    with pytest.raises(InputError, match=rf"^{path}:4: not valid JSON"):
        read_evaluation_texts(str(path))
    path.write_text('{"text": "one"}\n{"body": "two"}\n')
    with pytest.raises(InputError, match=rf"^{path}:2: a record needs a string 'text' field$"):
        read_evaluation_texts(str(path))
    path.write_text('{"text": "one"}\n{"text": "two"}\n')
    assert read_evaluation_texts(str(path)) == ["one", "two"]
