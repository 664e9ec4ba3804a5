"""The architecture registry: one entry per architecture is all the launcher needs. The llama entry has no FLOP
formula, so a real run of it shows the counted-FLOPs path end to end."""

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM

from launcher.architectures.registry import ARCHITECTURES, arch_names, architecture, archs_for, for_arch
from launcher.config.run import ModelSection, parse_run_config
from launcher.errors import ConfigError
from launcher.metrics.logger import read_metrics
from launcher.models.build import build_model, build_model_config, parameter_groups
from tests.crate_cli import REPO, run_crate

TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}


def test_lookups_name_the_known_architectures():
    assert arch_names() == ["crate", "gpt2", "llama", "tost", "vit"]
    assert archs_for("image") == ["crate", "tost", "vit"] and for_arch("crate", "image").model_type == "crate_vision"
    assert for_arch("tost", "image").model_type == "tost_vision" and for_arch("tost", "text") is None
    assert for_arch("vit", "text") is None
    with pytest.raises(ValueError, match=r"model_type='bert' is not a registered architecture: allowed values are "):
        architecture("bert")


def test_every_text_entry_builds_trains_and_groups_its_parameters():
    for entry in ARCHITECTURES.values():
        if entry.modality != "text":
            continue
        config = build_model_config(ModelSection(arch=entry.arch, **TINY), vocab_size=97, eos_token_id=0, seq_len=16)
        model = build_model(config)
        assert type(model) is entry.model_classes["causal-lm"]
        decayed, plain = parameter_groups(model, weight_decay=0.1)
        assert all(p.ndim >= 2 for p in decayed["params"]) and decayed["params"] and plain["params"]
        embedding = model.get_input_embeddings().weight
        assert any(p is embedding for p in plain["params"]), entry.model_type  # embeddings are never decayed


def test_unknown_arch_and_whitebox_without_an_adapter_are_one_line_config_errors(monkeypatch):
    base = {
        "output_dir": "/tmp/x",
        "tokenizer": "gpt2",
        "data": {"sources": [{"builtin": "shakespeare"}]},
        "train": {"max_steps": 1},
    }
    with pytest.raises(ConfigError, match=r"model.arch: unknown architecture 'bert': allowed values are \['crate'"):
        parse_run_config({**base, "model": {"arch": "bert"}})
    # Every shipped entry has white-box measures; an architecture registered without them is refused in one line.
    assert all(entry.whitebox is not None for entry in ARCHITECTURES.values())
    monkeypatch.setitem(ARCHITECTURES, "llama", dataclasses.replace(ARCHITECTURES["llama"], whitebox=None))
    with pytest.raises(ConfigError, match="train.whitebox_every: llama has no white-box measures; set it to 0"):
        parse_run_config({**base, "model": {"arch": "llama"}, "train": {"max_steps": 1, "whitebox_every": 5}})


@pytest.mark.slow
def test_an_architecture_without_a_flop_formula_is_counted_trained_and_exported(tmp_path):
    """Two ranks, ZeRO-2: the first step's FLOPs are counted (per token, over both ranks' tokens), MFU is reported
    from them, and the export loads as the HF model."""
    run_crate(
        "pretrain",
        REPO / "configs" / "lm" / "crate-tiny.yaml",
        tmp_path,
        "model.arch=llama",
        "model.preset=null",
        "model.hidden_size=64",
        "model.num_hidden_layers=2",
        "model.num_attention_heads=2",
        "tokenizer=gpt2",
        "data.seq_len=32",
        "train.micro_batch_size=2",
        "train.max_steps=4",
        "train.log_every=2",
        "train.eval_every=4",
        "train.eval_batches=1",
        "train.whitebox_every=4",
        "train.save_every=4",
        nproc=2,
    )
    rows = read_metrics(tmp_path, "train")
    counted = [row for row in rows if row.get("event") == "flops_counted"]
    assert len(counted) == 1 and counted[0]["step"] == 1
    d, layers, seq, vocab, inner = 64, 2, 32, 50257, 192  # SwiGLU at 8/3 d rounded up to 64
    forward = layers * (8 * d * d + 6 * d * inner + 4 * seq * d) + 2 * d * vocab
    assert counted[0]["flops_per_token"] == pytest.approx(3 * forward, rel=0.05)
    mfu = [row["mfu"] for row in rows if "mfu" in row]
    assert mfu and all(value > 0 for value in mfu)
    assert [row["layer"] for row in read_metrics(tmp_path, "whitebox") if row["step"] == 4] == [0, 1]
    # The export is a plain transformers Llama (no remote code) and scores the run's validation blocks exactly as
    # the run's last evaluation did (each rank's micro-batch mean, averaged).
    export = tmp_path / "hf"
    assert not list(export.glob("*.py"))
    model = AutoModelForCausalLM.from_pretrained(export).eval()
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.tie_word_embeddings
    from launcher.config.run import load_run_config
    from launcher.models.tokenizers import load_tokenizer
    from launcher.train.tasks import fixed_blocks, held_out_spec

    config = load_run_config(tmp_path / "config.yaml")
    blocks = fixed_blocks(held_out_spec(config), load_tokenizer("gpt2"), 4)
    with torch.no_grad():
        losses = [model(input_ids=blocks[r::2], labels=blocks[r::2]).loss.item() for r in range(2)]
    assert sum(losses) / 2 == pytest.approx(read_metrics(tmp_path, "eval")[-1]["loss"], abs=1e-4)
    # Fine-tuned as a text classifier through the same path.
    probe = tmp_path / "classifier"
    run_crate(
        "finetune",
        REPO / "configs" / "text" / "finetune-rotten-tomatoes.yaml",
        probe,
        f"model.init_from={export}",
        "train.max_steps=4",
        "train.eval_every=4",
        "train.save_every=4",
        "train.micro_batch_size=4",
    )
    start = next(row for row in read_metrics(probe, "train") if row.get("event") == "start")
    assert (start["task"], start["head"]) == ("sequence-classification", "new")
    from transformers import AutoModelForSequenceClassification

    classifier = AutoModelForSequenceClassification.from_pretrained(probe / "hf")
    assert type(classifier).__name__ == "LlamaForSequenceClassification"
    # crate compare reads the run: the llama family, its non-embedding parameters, the counted FLOPs of its tokens
    from launcher.analysis.compare import collect_runs

    (summary,) = collect_runs([tmp_path])
    assert summary.family == "llama" and summary.steps == 4
    assert summary.non_embedding_params == layers * (4 * d * d + 3 * d * inner + 2 * d) + d  # + RMSNorm weights
    assert summary.flops == pytest.approx(summary.tokens * counted[0]["flops_per_token"])
