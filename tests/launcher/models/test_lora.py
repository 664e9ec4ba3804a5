"""LoRA through PEFT on CRATE models: the registered defaults, ``all-linear`` and the ISTA dictionary as targets, only
adapters training, adapter save/load and merging; the launcher's ``lora:`` section end to end with 2 ranks."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import crate_lm
from crate_lm import CrateForCausalLM, CrateForSequenceClassification, config_from_preset
from launcher.config.run import parse_run_config
from launcher.errors import ConfigError
from launcher.models.build import apply_lora
from launcher.train.export import export_hf
from tests.crate_cli import REPO, run_crate


def tiny(preset: str = "crate-test", **fields):
    torch.manual_seed(0)
    return config_from_preset(preset, **fields)


def adapted_modules(model) -> set[str]:
    """Names (relative to a layer) of the modules holding LoRA weights."""
    return {
        name.split(".lora_A")[0].split("layers.0.")[1]
        for name, _ in model.named_parameters()
        if ".layers.0." in name and ".lora_A" in name
    }


def test_default_targets_are_the_attention_maps_and_all_linear_adds_the_mlp_not_the_head():
    model = get_peft_model(CrateForCausalLM(tiny()), LoraConfig(task_type="CAUSAL_LM"))
    assert adapted_modules(model) == {"attention.subspace_proj", "attention.out_proj"}
    assert set(crate_lm.LORA_TARGET_MODULES) == {"subspace_proj", "out_proj"}

    tost = get_peft_model(
        CrateForCausalLM(tiny("tost-tiny")), LoraConfig(task_type="CAUSAL_LM", target_modules="all-linear")
    )
    assert adapted_modules(tost) == {"attention.subspace_proj", "attention.out_proj", "mlp.fc_in", "mlp.fc_out"}
    assert not any("lm_head" in name and "lora" in name for name, _ in tost.named_parameters())


def test_ista_dictionary_is_adapted_through_target_parameters():
    model = get_peft_model(
        CrateForCausalLM(tiny()),
        LoraConfig(task_type="CAUSAL_LM", target_modules=[], target_parameters=list(crate_lm.ISTA_TARGET_PARAMETERS)),
    )
    assert adapted_modules(model) == {"ista"}
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert grads and all(
        g is not None and g.abs().sum() > 0 for name, g in grads.items() if "lora_B" in name
    )  # A: zero while B is 0


def test_only_adapters_and_head_train_and_the_adapter_saves_loads_and_merges(tmp_path):
    config = tiny(num_labels=3, pad_token_id=0)
    pretrained = CrateForSequenceClassification(config)
    pretrained_state = {k: v.clone() for k, v in pretrained.state_dict().items()}
    model = get_peft_model(pretrained, LoraConfig(task_type="SEQ_CLS", r=4))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name or ".score." in name for name in trainable)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(1, config.vocab_size, (4, 10))
    for _ in range(3):
        model(input_ids=ids, labels=torch.tensor([0, 1, 2, 1])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    current = {
        name.replace(".base_layer", "").replace(".original_module", ""): value
        for name, value in model.get_base_model().state_dict().items()
        if "lora_" not in name and "modules_to_save" not in name
    }
    assert current.keys() == pretrained_state.keys()
    for name, value in pretrained_state.items():  # every original weight untouched (the head trains a copy)
        assert torch.equal(current[name], value), name
    assert any(p.abs().sum() > 0 for name, p in model.named_parameters() if "lora_B" in name)  # B starts at 0

    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert set(saved["target_modules"]) == {"subspace_proj", "out_proj"}
    fresh = CrateForSequenceClassification(config)
    fresh.load_state_dict(pretrained_state)
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    merged = model.merge_and_unload().eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected)
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_export_writes_the_merged_model_and_the_adapter_without_touching_the_training_model(tmp_path, gpt2_ranks_path):
    from launcher.models.tokenizers import load_tokenizer

    tokenizer = load_tokenizer("gpt2")
    config = tiny(vocab_size=256)
    model = apply_lora(CrateForCausalLM(config), parse_run_config(_lora_run()).lora, "causal-lm", str(tmp_path))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.1)  # a trained adapter: not the identity
    ids = torch.randint(0, 256, (2, 9))
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    export_hf(model, tokenizer, tmp_path / "hf", is_main=True, save_adapter=True)

    merged = CrateForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert merged.config.tie_word_embeddings and merged.lm_head.weight is merged.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(input_ids=ids).logits, expected)  # still adapted, unmerged
    assert any("lora_A" in name for name, _ in model.named_parameters())
    adapter = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(tmp_path.resolve())


def _lora_run(**lora) -> dict:
    return {
        "output_dir": "/tmp/x",
        "model": {"init_from": "runs/x/hf"},
        "lora": lora,
        "data": {"sources": ["rotten-tomatoes"], "max_length": 32},
        "train": {"max_steps": 1},
    }


def test_lora_section_is_validated_with_one_line_errors():
    assert parse_run_config(_lora_run()).lora.r == 8
    with pytest.raises(ConfigError, match=r"lora.rank: unknown key"):
        parse_run_config(_lora_run(rank=4))
    with pytest.raises(ConfigError, match=r"lora: adapts a pretrained model; set model.init_from"):
        parse_run_config({**_lora_run(), "model": {"preset": "crate-tiny"}})
    with pytest.raises(ConfigError, match=r"lora: a linear probe"):
        parse_run_config({**_lora_run(), "model": {"init_from": "x", "linear_probe": True}})
    with pytest.raises(ConfigError, match=r"lora.target_modules: .*not_a_module"):
        apply_lora(
            CrateForCausalLM(tiny()),
            parse_run_config(_lora_run(target_modules=["not_a_module"])).lora,
            "causal-lm",
            "x",
        )


@pytest.mark.slow
def test_lora_fine_tuning_with_zero3_trains_only_adapters_and_exports_merged_and_adapter(pretrained_lm, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from launcher.metrics.logger import read_metrics
    from launcher.train.export import export_checkpoint

    out = tmp_path / "lora"
    run_crate(
        "finetune",
        REPO / "configs" / "text" / "finetune-rotten-tomatoes.yaml",
        out,
        f"model.init_from={pretrained_lm}",
        "lora={r: 4, target_parameters: [dictionary]}",
        "zero.stage=3",
        "train.max_steps=12",
        "train.eval_every=12",
        "train.save_every=12",
        "train.micro_batch_size=8",
        "optimizer.lr=3e-3",
        "optimizer.warmup_steps=2",
        nproc=2,
    )
    start = next(row for row in read_metrics(out, kind="train") if row.get("event") == "start")
    layers, width, rank = 4, 128, 4  # crate-tiny; each layer adapts subspace_proj, out_proj and the dictionary (d x d)
    lora_per_layer = 3 * 2 * rank * width
    assert start["trainable_params"] == layers * lora_per_layer + 2 * width, start  # + the 2-label score head

    merged = AutoModelForSequenceClassification.from_pretrained(out / "hf").eval()
    pretrained = AutoModelForCausalLM.from_pretrained(pretrained_lm)
    changed = {
        name
        for name, value in pretrained.model.state_dict().items()
        if not torch.equal(value, merged.model.state_dict()[name])
    }
    assert changed == {
        f"layers.{i}.{part}"
        for i in range(layers)
        for part in ("attention.subspace_proj.weight", "attention.out_proj.weight", "ista.dictionary")
    }

    tokenizer = AutoTokenizer.from_pretrained(out / "hf")
    batch = tokenizer(["A moving, beautiful film.", "Dull."], return_tensors="pt", padding=True)
    base = AutoModelForSequenceClassification.from_pretrained(
        pretrained_lm,
        num_labels=2,
        id2label=merged.config.id2label,
        label2id=merged.config.label2id,
        pad_token_id=merged.config.pad_token_id,
    )
    adapted = PeftModel.from_pretrained(base, out / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(adapted(**batch).logits, merged(**batch).logits, rtol=1e-4, atol=1e-5)

    again = export_checkpoint(out, out=tmp_path / "again")  # from the ZeRO-3 shards, one process
    assert (again / "model.safetensors").read_bytes() == (out / "hf" / "model.safetensors").read_bytes()
    assert (tmp_path / "again-adapter" / "adapter_model.safetensors").read_bytes() == (
        out / "adapter" / "adapter_model.safetensors"
    ).read_bytes()
