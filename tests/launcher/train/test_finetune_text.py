"""`crate finetune` for text classification end to end: a tiny CRATE LM pretrained here, fine-tuned on the built-in
Rotten Tomatoes task by 2 processes with real DeepSpeed; the export used through HF; the GPT-2 baseline path."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.metrics.logger import read_metrics
from tests.crate_cli import run_crate as crate

REPO = Path(__file__).resolve().parents[3]
ROTTEN = REPO / "configs" / "text" / "finetune-rotten-tomatoes.yaml"
TINY_LM = REPO / "configs" / "lm" / "crate-tiny.yaml"

pytestmark = pytest.mark.slow


def test_crate_lm_finetuned_on_rotten_tomatoes_beats_the_majority_class(pretrained_lm, tmp_path):
    from data_pipeline.labelled import rotten_tomatoes

    out = tmp_path / "rt"
    crate(
        "finetune",
        ROTTEN,
        out,
        f"model.init_from={pretrained_lm}",
        "train.max_steps=300",
        "train.eval_every=300",
        "train.save_every=300",
        "train.micro_batch_size=16",
        nproc=2,
    )
    start = next(row for row in read_metrics(out, kind="train") if row.get("event") == "start")
    assert (start["task"], start["head"], start["world_size"]) == ("sequence-classification", "new", 2)
    result = read_metrics(out, kind="eval")[-1]
    validation = rotten_tomatoes("validation")
    majority = max(sum(r["label"] for r in validation), sum(1 - r["label"] for r in validation)) / len(validation)
    assert result["examples"] == len(validation)
    assert result["accuracy"] > majority + 0.02, (result, majority)
    assert result["macro_f1"] > 0.5, result

    from transformers import AutoModelForSequenceClassification, pipeline

    import crate_lm  # noqa: F401

    model = AutoModelForSequenceClassification.from_pretrained(out / "hf")
    assert type(model).__name__ == "CrateForSequenceClassification"
    assert model.config.id2label == {0: "rotten", 1: "fresh"} and model.config.pad_token_id is not None
    classifier = pipeline("text-classification", model=str(out / "hf"))
    outputs = classifier(["A triumph: moving, funny and beautifully made.", "A dull, lifeless mess."])
    assert all(output["label"] in ("rotten", "fresh") and 0.5 <= output["score"] <= 1 for output in outputs)


def test_gpt2_classifier_through_the_same_path(tmp_path):
    out = tmp_path / "gpt2"
    crate(
        "pretrain",
        ROTTEN,
        out,
        "model.init_from=null",
        "model.arch=gpt2",
        "model.hidden_size=64",
        "model.num_hidden_layers=2",
        "model.num_attention_heads=4",
        "model.max_position_embeddings=64",
        "tokenizer=gpt2",
        "train.max_steps=10",
        "train.eval_every=10",
        "train.save_every=10",
    )
    result = read_metrics(out, kind="eval")[-1]
    assert 0 <= result["accuracy"] <= 1 and result["examples"] > 1000
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(out / "hf")
    assert type(model).__name__ == "GPT2ForSequenceClassification" and model.config.num_labels == 2


def test_causal_lm_fine_tuning_on_new_text_keeps_the_checkpoint_tokenizer(pretrained_lm, tmp_path):
    from data_pipeline.labelled import rotten_tomatoes

    corpus = tmp_path / "reviews.txt"
    corpus.write_text("\n".join(row["text"] for row in rotten_tomatoes("train")[:2000]))
    held_out = tmp_path / "held-out.txt"
    held_out.write_text("\n".join(row["text"] for row in rotten_tomatoes("validation")[:300]))
    out = tmp_path / "lm"
    crate(
        "finetune",
        TINY_LM,
        out,
        "model.preset=null",
        f"model.init_from={pretrained_lm}",
        "tokenizer=null",
        f"data.sources=[{corpus}]",
        f"eval_data.sources=[{held_out}]",
        "train.max_steps=20",
        "train.eval_every=10",
        "train.save_every=20",
        "train.whitebox_every=0",
    )
    evals = read_metrics(out, kind="eval")
    assert [row["step"] for row in evals] == [10, 20] and evals[1]["loss"] < evals[0]["loss"]
    assert (out / "hf" / "tokenizer.json").read_text() == (pretrained_lm / "tokenizer.json").read_text()
