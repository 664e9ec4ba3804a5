"""`crate finetune` for text classification end to end: a tiny CRATE LM pretrained here, fine-tuned on the built-in
Rotten Tomatoes task by 2 processes with real DeepSpeed; the export used through HF; the GPT-2 baseline path."""

from __future__ import annotations

import json
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


def test_gpt2_classifier_through_the_same_path_reports_bad_rows_and_no_validation(tmp_path):
    """The GPT-2 baseline on 2 ranks, on the built-in reviews plus a file with 2 bad rows: both ranks read all the
    examples, so the bad rows are counted once; a local source has no held-out split, so the run warns."""
    extra = tmp_path / "more-reviews.jsonl"
    rows = [json.dumps({"text": f"review {i}", "label": "fresh" if i % 2 else "rotten"}) for i in range(20)]
    rows[2], rows[6] = "not json", json.dumps({"text": "so-so", "label": "meh"})
    extra.write_text("\n".join(rows) + "\n")
    out = tmp_path / "gpt2"
    result = crate(
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
        f"data.sources=[rotten-tomatoes, {extra}]",
        "data.labels=[rotten, fresh]",
        "train.max_steps=10",
        "train.eval_every=10",
        "train.save_every=10",
        nproc=2,
    )
    assert read_metrics(out, kind="eval") == []
    assert "step 0 warning: no validation: the sources have no held-out split; set eval_data" in result.stderr
    first = [f"{extra}: line 3: invalid_json", f"{extra}: line 7: bad_label"]
    row = [row for row in read_metrics(out, kind="train") if "loss" in row][-1]
    assert row["bad_records"] == {
        "total": 2,
        "by_reason": {"invalid_json": 1, "bad_label": 1},
        "by_source": {str(extra): 2},
        "first": first,
    }
    assert f"step 10 warning: 2 bad records skipped so far (within data.max_bad_fraction): {extra} (2); " in (
        result.stderr
    )
    assert "; ".join(first) in result.stderr and "| bad 2" in result.stderr
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
