"""The tools users already use, on our models: ``transformers.Trainer`` (plain, PEFT LoRA, DeepSpeed ZeRO-2) and
``accelerate launch``, through ``examples/trainer_finetune.py``, on a briefly pretrained crate-tiny
(``CrateForSequenceClassification`` on Rotten Tomatoes, ``CrateForCausalLM`` on review text)."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from tests.crate_cli import REPO

pytestmark = pytest.mark.slow

EXAMPLE = REPO / "examples" / "trainer_finetune.py"
ZERO2 = REPO / "configs" / "deepspeed" / "trainer-zero2.json"
PROBE_TEXTS = ["A triumph: moving, funny and beautifully made.", "A dull, lifeless mess.", "It is a film."]


def example():
    """``examples/trainer_finetune.py`` as a module (it is a script, not part of a package)."""
    spec = importlib.util.spec_from_file_location("trainer_finetune", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def review_files(tmp_path_factory):
    """Small data files cut from Rotten Tomatoes: labelled CSV (train) and plain text (train / held out)."""
    from data_pipeline.labelled import ROTTEN_TOMATOES_LABELS, rotten_tomatoes

    root = tmp_path_factory.mktemp("reviews")
    train, validation = rotten_tomatoes("train"), rotten_tomatoes("validation")
    with open(root / "reviews.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "label"])
        writer.writeheader()
        for row in train[:400]:
            writer.writerow({"text": row["text"], "label": ROTTEN_TOMATOES_LABELS[row["label"]]})
    (root / "train.txt").write_text("\n".join(row["text"] for row in train[:1500]), encoding="utf-8")
    (root / "held-out.txt").write_text("\n".join(row["text"] for row in validation[:200]), encoding="utf-8")
    return root


def logits_of(model, tokenizer, texts=PROBE_TEXTS) -> torch.Tensor:
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_trainer_causal_lm_lowers_the_held_out_loss_and_the_export_generates(pretrained_lm, review_files, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import crate_lm  # noqa: F401

    out = tmp_path / "lm"
    metrics = example().main(
        [
            "--model",
            str(pretrained_lm),
            "--task",
            "causal-lm",
            "--data",
            str(review_files / "train.txt"),
            "--eval-data",
            str(review_files / "held-out.txt"),
            "--output",
            str(out),
            "--max-steps",
            "20",
            "--batch-size",
            "8",
            "--lr",
            "1e-3",
            "--eval-before",
        ]
    )
    assert metrics["eval_loss"] < metrics["initial_eval_loss"] - 0.05, metrics
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "CrateForCausalLM"
    prompt = tokenizer("The film", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert generated.shape == (1, prompt["input_ids"].shape[1] + 8)


def test_lora_through_trainer_trains_only_the_adapter_and_reloads(pretrained_lm, review_files, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    import crate_lm  # noqa: F401

    module = example()
    out = tmp_path / "lora"
    args = module.parse_args(
        [
            "--model",
            str(pretrained_lm),
            "--task",
            "sequence-classification",
            "--data",
            str(review_files / "reviews.csv"),
            "--output",
            str(out),
            "--max-steps",
            "10",
            "--batch-size",
            "8",
            "--lr",
            "3e-3",
            "--lora",
            "--lora-r",
            "4",
        ]
    )
    trainer, tokenizer = module.build_trainer(args)
    model = trainer.model
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name or ".modules_to_save." in name for name in trainable), trainable
    assert any("subspace_proj.lora_A" in name for name in trainable)
    assert any("out_proj.lora_B" in name for name in trainable)
    assert any(".score.modules_to_save." in name for name in trainable)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}

    trainer.train()

    pretrained = load_file(pretrained_lm / "model.safetensors")
    frozen = 0
    for name, p in model.named_parameters():
        if name in trainable:
            continue
        assert torch.equal(p, before[name]), name  # bit-identical
        key = name.removeprefix("base_model.model.").replace(".base_layer", "")
        if key in pretrained:
            assert torch.equal(p, pretrained[key]), name
            frozen += 1
    assert frozen >= 30  # every transformer weight was found in the checkpoint
    assert all(not torch.equal(p, before[name]) for name, p in model.named_parameters() if "lora_B" in name)
    trained_logits = logits_of(model, tokenizer)

    module.save(trainer, tokenizer, args)
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not (out / "model.safetensors").exists()
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] in (
        ["subspace_proj", "out_proj"],
        ["out_proj", "subspace_proj"],
    )
    base = AutoModelForSequenceClassification.from_pretrained(
        pretrained_lm,
        num_labels=2,
        id2label={0: "fresh", 1: "rotten"},
        label2id={"fresh": 0, "rotten": 1},
        pad_token_id=tokenizer.pad_token_id,
    )
    reloaded = PeftModel.from_pretrained(base, out)
    torch.testing.assert_close(logits_of(reloaded, tokenizer), trained_logits, rtol=1e-5, atol=1e-5)
    merged = AutoModelForSequenceClassification.from_pretrained(out / "merged")
    assert type(merged).__name__ == "CrateForSequenceClassification"
    torch.testing.assert_close(logits_of(merged, tokenizer), trained_logits, rtol=1e-4, atol=1e-5)


def test_trainer_classifier_beats_the_majority_class(pretrained_lm, tmp_path):
    from transformers import AutoModelForSequenceClassification, pipeline

    import crate_lm  # noqa: F401
    from data_pipeline.labelled import rotten_tomatoes

    out = tmp_path / "rt"
    metrics = example().main(
        [
            "--model",
            str(pretrained_lm),
            "--task",
            "sequence-classification",
            "--data",
            "rotten-tomatoes",
            "--output",
            str(out),
            "--max-steps",
            "1500",
            "--batch-size",
            "32",
            "--lr",
            "5e-4",
            "--max-length",
            "64",
        ]
    )
    validation = rotten_tomatoes("validation")
    fresh = sum(row["label"] for row in validation)
    majority = max(fresh, len(validation) - fresh) / len(validation)
    assert metrics["eval_accuracy"] > majority + 0.02, (metrics, majority)
    assert 0.5 < metrics["eval_macro_f1"] <= 1, metrics

    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert type(model).__name__ == "CrateForSequenceClassification"
    assert model.config.id2label == {0: "rotten", 1: "fresh"} and model.config.pad_token_id is not None
    outputs = pipeline("text-classification", model=str(out))(PROBE_TEXTS[:2])
    assert all(output["label"] in ("rotten", "fresh") for output in outputs)


def accelerate_launch(*args: str, processes: int = 2) -> dict:
    """``accelerate launch --multi_gpu --num_processes N examples/trainer_finetune.py ARGS`` from the repository
    root; returns the metrics line (rank 0's last stdout line). ``--multi_gpu`` is what starts N processes (torchrun)
    on a machine without GPUs: ``--cpu`` is the single-process launcher."""
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(EXAMPLE),
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=REPO, env=env)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
    lines = [line for line in result.stdout.splitlines() if line.startswith('{"task"')]
    assert len(lines) == 1, result.stdout[-3000:]  # rank 0 reports
    return json.loads(lines[0])


def test_accelerate_launch_two_processes_with_deepspeed_zero2(pretrained_lm, review_files, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import crate_lm  # noqa: F401

    out = tmp_path / "ds"
    metrics = accelerate_launch(
        "--model",
        str(pretrained_lm),
        "--task",
        "sequence-classification",
        "--data",
        str(review_files / "reviews.csv"),
        "--output",
        str(out),
        "--max-steps",
        "4",
        "--batch-size",
        "8",
        "--deepspeed",
        str(ZERO2),
    )
    assert (metrics["world_size"], metrics["distributed_type"], metrics["steps"]) == (2, "DEEPSPEED", 4)
    assert all(math.isfinite(metrics[key]) for key in ("train_loss", "eval_loss", "eval_accuracy"))
    assert metrics["train_loss"] < 1.0  # a fresh two-way head starts near ln 2 = 0.69, not at 2 x ln 2
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.id2label == {0: "fresh", 1: "rotten"}  # the CSV's label names, sorted
    assert logits_of(model, AutoTokenizer.from_pretrained(out)).isfinite().all()


def test_accelerate_launch_two_processes_ddp_causal_lm(pretrained_lm, review_files, tmp_path):
    from transformers import AutoModelForCausalLM

    import crate_lm  # noqa: F401

    out = tmp_path / "ddp"
    metrics = accelerate_launch(
        "--model",
        str(pretrained_lm),
        "--task",
        "causal-lm",
        "--data",
        str(review_files / "train.txt"),
        "--eval-data",
        str(review_files / "held-out.txt"),
        "--output",
        str(out),
        "--max-steps",
        "4",
        "--batch-size",
        "4",
    )
    assert (metrics["world_size"], metrics["distributed_type"], metrics["steps"]) == (2, "MULTI_CPU", 4)
    assert all(math.isfinite(metrics[key]) for key in ("train_loss", "eval_loss", "eval_perplexity"))
    assert type(AutoModelForCausalLM.from_pretrained(out)).__name__ == "CrateForCausalLM"
