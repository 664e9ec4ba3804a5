"""CRATE language models as HuggingFace models: sizes, math, causality, cache, save/load, Auto classes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    DynamicCache,
    GPT2Config,
    GPT2LMHeadModel,
)

import crate_lm
from crate_lm import (
    CrateCache,
    CrateConfig,
    CrateForCausalLM,
    CrateForSequenceClassification,
    CrateModel,
    config_from_preset,
    count_parameters,
    preset_names,
)
from crate_lm.configuration_crate import VARIANT_KNOBS
from crate_lm.modeling_crate import CrateISTA

VARIANTS = VARIANT_KNOBS


def tiny_model(variant: str = "crate", seed: int = 0, **overrides) -> CrateForCausalLM:
    torch.manual_seed(seed)
    config = config_from_preset("crate-test", **{**VARIANTS[variant], **overrides})
    assert config.variant == variant
    return CrateForCausalLM(config).eval()


def random_ids(batch: int, tokens: int, seed: int = 1, vocab: int = 512) -> torch.Tensor:
    return torch.randint(1, vocab, (batch, tokens), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------- sizes


# The published presets' exact counts and official behaviours: test_fidelity.py.


def test_crate_layer_has_3d2_plus_5d_parameters():
    config = config_from_preset("crate-test")
    d = config.hidden_size
    layer = CrateForCausalLM(config).model.layers[0]
    assert sum(p.numel() for p in layer.parameters()) == 3 * d * d + 5 * d


def test_autoconfig_for_model_gives_causal_crate_base():
    shape = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 1024}
    official = AutoConfig.for_model("crate", **shape, final_layer_norm=False, vocab_pad_multiple=64)
    defaults = AutoConfig.for_model("crate", **shape)  # the older behaviour: a final LN, the vocabulary unpadded
    assert isinstance(official, CrateConfig) and official.variant == "crate"
    with torch.device("meta"):
        assert count_parameters(AutoModelForCausalLM.from_config(official)) == 59_913_216  # 59.9M as published
        assert count_parameters(AutoModelForCausalLM.from_config(defaults)) == 59_913_216 + 2 * 768 - 47 * 768


def test_tied_head_and_embedding_share_storage():
    model = tiny_model()
    assert model.lm_head.weight is model.model.embed_tokens.weight


# ---------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: config_from_preset("no-such-preset"), "no-such-preset"),
        (lambda: CrateConfig(hidden_size=30, num_attention_heads=4), "hidden_size"),
        (lambda: CrateConfig(ista_dictionary_ratio=2), "ista_dictionary_ratio"),
        (lambda: CrateConfig(ista_steps=3), "ista_steps"),
        (lambda: CrateConfig(attention_type="linear"), "attention_type"),
        (lambda: CrateConfig(attention_type="tssa", ista_dictionary_ratio=4, ista_steps=2), "attention_type"),
        (lambda: CrateConfig(ista_dictionary_ratio=4, ista_steps=1), "ista_steps"),
        (lambda: CrateConfig(ista_step_size=0.0), "ista_step_size"),
    ],
)
def test_bad_config_is_one_line_error_naming_the_field(make, field):
    with pytest.raises(ValueError) as error:
        make()
    message = str(error.value)
    assert field in message and "\n" not in message


def test_sequence_longer_than_position_table_is_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="max_position_embeddings=64"):
        model(random_ids(1, 65))


# ---------------------------------------------------------------------------------------------------- math


@pytest.mark.parametrize("tokens", [5, 100])  # 100 tokens > 2d take the fused one-matmul form
def test_ista_one_step_matches_the_formula(tokens):
    torch.manual_seed(0)
    config = config_from_preset("crate-test")
    ista = CrateISTA(config)
    torch.nn.init.normal_(ista.dictionary, std=0.3)
    z = torch.randn(3, tokens, config.hidden_size)
    D, eta, lam = ista.dictionary.detach(), config.ista_step_size, config.ista_lambda
    expected = torch.stack(
        [F.relu(v + eta * D.T @ (v - D @ v) - eta * lam) for v in z.reshape(-1, config.hidden_size)]
    ).reshape_as(z)
    output, code = ista(z)
    torch.testing.assert_close(output, expected)
    torch.testing.assert_close(code, expected)


@pytest.mark.parametrize("decoupled", [False, True])
def test_ista_overcomplete_two_steps_match_the_formula(decoupled):
    torch.manual_seed(0)
    config = config_from_preset("crate-test", **(VARIANTS["crate-alpha"] if decoupled else VARIANTS["crate-lm"]))
    ista = CrateISTA(config)
    for dictionary in (ista.dictionary, ista.decoder):
        if dictionary is not None:
            torch.nn.init.normal_(dictionary, std=0.3)
    z = torch.randn(7, config.hidden_size)
    D, eta, lam = ista.dictionary.detach(), config.ista_step_size, config.ista_lambda
    codes, decoded = [], []
    for v in z:
        a1 = F.relu(eta * D.T @ v - eta * lam)
        a2 = F.relu(a1 + eta * D.T @ (v - D @ a1) - eta * lam)
        codes.append(a2)
        decoded.append((ista.decoder.detach() if decoupled else D) @ a2)
    output, code = ista(z)
    assert code.shape[-1] == 4 * config.hidden_size
    torch.testing.assert_close(code, torch.stack(codes))
    torch.testing.assert_close(output, torch.stack(decoded))


def _lasso(z, D, a, lam):
    return lam * a.abs().sum(-1) + 0.5 * (z - a @ D.T).square().sum(-1)


def test_proximal_step_lowers_the_lasso_objective():
    """On a well-conditioned D (eta <= 1/||D||^2), each proximal step from a feasible point cannot raise
    lambda ||a||_1 + 1/2 ||z - D a||^2; the warm start a = z is feasible for z >= 0."""
    torch.manual_seed(0)
    config = config_from_preset("crate-test")
    d = config.hidden_size
    ista = CrateISTA(config)
    with torch.no_grad():
        ista.dictionary.copy_(torch.eye(d) + 0.1 * torch.randn(d, d) / d**0.5)
    assert torch.linalg.matrix_norm(ista.dictionary, ord=2) ** 2 < 1 / config.ista_step_size
    z = torch.randn(64, d).abs()
    D, lam = ista.dictionary.detach(), config.ista_lambda
    with torch.no_grad():
        a1 = ista.proximal_step(z, z)
        a2 = ista.proximal_step(z, a1)
    before, after_one, after_two = _lasso(z, D, z, lam), _lasso(z, D, a1, lam), _lasso(z, D, a2, lam)
    assert (after_one <= before + 1e-6).all() and (after_one < before).any()
    assert (after_two <= after_one + 1e-6).all()
    assert (a1 >= 0).all()


def test_mssa_is_sdpa_with_q_equal_k_equal_v():
    model = tiny_model()
    attention = model.model.layers[0].attention
    x = torch.randn(2, 9, model.config.hidden_size)
    with torch.no_grad():
        out, _, w = attention(x)
        scores = w @ w.transpose(-1, -2) / attention.head_dim**0.5
        causal = torch.ones(9, 9, dtype=torch.bool).tril()
        heads = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ w
        expected = attention.out_proj(heads.transpose(1, 2).reshape(2, 9, -1))
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_eager_attention_path_equals_sdpa(variant):
    model = tiny_model(variant)
    ids = random_ids(2, 12)
    with torch.no_grad():
        plain = model(ids).logits
        eager = model(ids, output_attentions=True)
    torch.testing.assert_close(plain, eager.logits, rtol=1e-5, atol=1e-5)
    assert len(eager.attentions) == model.config.num_hidden_layers


# ---------------------------------------------------------------------------------------------------- causality


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_changing_a_token_never_changes_earlier_logits(variant):
    model = tiny_model(variant)
    ids = random_ids(2, 16)
    with torch.no_grad():
        reference = model(ids).logits
        for position in (0, 7, 15):
            changed = ids.clone()
            changed[:, position] = (changed[:, position] + 17) % 512
            logits = model(changed).logits
            torch.testing.assert_close(logits[:, :position], reference[:, :position], rtol=0, atol=1e-6)
            assert not torch.allclose(logits[:, position], reference[:, position])


# ---------------------------------------------------------------------------------------------------- padding


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_padded_batch_matches_each_sequence_alone(variant):
    model = tiny_model(variant)
    short, long = random_ids(1, 6, seed=2), random_ids(1, 10, seed=3)
    with torch.no_grad():
        alone_short, alone_long = model(short).logits, model(long).logits
        for side in ("left", "right"):
            pad = torch.zeros(1, 4, dtype=torch.long)
            ids = torch.cat([torch.cat([pad, short], 1) if side == "left" else torch.cat([short, pad], 1), long])
            mask = (torch.arange(10) >= 4 if side == "left" else torch.arange(10) < 6).long()
            mask = torch.stack([mask, torch.ones(10, dtype=torch.long)])
            logits = model(ids, attention_mask=mask).logits
            valid = slice(4, 10) if side == "left" else slice(0, 6)
            torch.testing.assert_close(logits[0, valid], alone_short[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(logits[1], alone_long[0], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- generation


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_generation_is_identical_with_and_without_cache(variant):
    model = tiny_model(variant)
    ids = random_ids(2, 8)
    cached = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False, use_cache=True
    )
    uncached = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False, use_cache=False
    )
    assert cached.shape == (2, 20)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_batched_left_padded_generation_matches_single_prompts(variant):
    model = tiny_model(variant)
    prompts = [random_ids(1, 4, seed=5)[0], random_ids(1, 9, seed=6)[0]]
    singles = [
        model.generate(
            p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long), max_new_tokens=10, do_sample=False
        )[0, len(p) :]
        for p in prompts
    ]
    ids = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, 9 - len(prompt) :] = prompt
        mask[row, 9 - len(prompt) :] = 1
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    for row in range(2):
        assert torch.equal(batched[row, 9:], singles[row])


@pytest.mark.parametrize("variant", ["crate", "tost"])
def test_chunked_prefill_through_the_cache_equals_one_forward(variant):
    model = tiny_model(variant)
    ids = random_ids(2, 14)
    with torch.no_grad():
        full = model(ids).logits
        cache = CrateCache(model.config)
        first = model(ids[:, :9], cache=cache, use_cache=True).logits
        second = model(ids[:, 9:], cache=cache, use_cache=True).logits
    torch.testing.assert_close(torch.cat([first, second], 1), full, rtol=1e-5, atol=1e-5)
    assert cache.get_seq_length() == 14


def test_mssa_cache_stores_one_tensor_per_layer_half_of_gpt2():
    model = tiny_model()
    config = model.config
    ids = random_ids(2, 10)
    out = model(ids, use_cache=True)
    layers = out.cache.layers
    assert len(layers) == config.num_hidden_layers
    for layer in layers:
        assert layer.keys is layer.values
        assert layer.keys.shape == (2, config.num_attention_heads, 10, config.head_dim)
    assert out.cache.nbytes() == config.num_hidden_layers * 2 * 10 * config.hidden_size * 4

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=512,
            n_embd=config.hidden_size,
            n_layer=config.num_hidden_layers,
            n_head=config.num_attention_heads,
        )
    ).eval()
    gpt2_cache = gpt2(ids, use_cache=True).cache
    assert isinstance(gpt2_cache, DynamicCache)
    gpt2_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in gpt2_cache.layers)
    assert out.cache.nbytes() * 2 == gpt2_bytes


def test_tssa_cache_is_constant_size():
    model = tiny_model("tost")
    ids = random_ids(1, 4)
    short = model.generate(ids, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    long = model.generate(ids, max_new_tokens=30, do_sample=False, return_dict_in_generate=True)
    assert short.cache.get_seq_length() < long.cache.get_seq_length()
    assert short.cache.nbytes() == long.cache.nbytes() > 0


@pytest.mark.parametrize("variant", ["crate", "tost"])
def test_beam_search_and_multiple_samples_run(variant):
    model = tiny_model(variant)
    ids = random_ids(2, 5)
    beams = model.generate(ids, max_new_tokens=6, num_beams=3, num_return_sequences=2, do_sample=False)
    assert beams.shape == (4, 11)
    torch.manual_seed(0)
    samples = model.generate(ids, max_new_tokens=6, do_sample=True, top_k=20, num_return_sequences=3)
    assert samples.shape == (6, 11)


# ---------------------------------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hidden_states_attentions_and_sparse_codes(variant):
    model = tiny_model(variant)
    config = model.config
    out = model(random_ids(2, 7), output_hidden_states=True, output_attentions=True, output_sparse_codes=True)
    assert len(out.hidden_states) == config.num_hidden_layers + 1
    assert all(h.shape == (2, 7, config.hidden_size) for h in out.hidden_states)
    attention_shape = (2, config.num_attention_heads, 7) + (() if variant == "tost" else (7,))
    assert all(a.shape == attention_shape for a in out.attentions)
    code_width = config.mlp_ratio * config.hidden_size if variant == "tost" else config.dictionary_size
    assert all(c.shape == (2, 7, code_width) for c in out.sparse_codes)
    assert all(w.shape == (2, config.num_attention_heads, 7, config.head_dim) for w in out.subspace_projections)
    if variant != "tost":
        assert any((c == 0).any() for c in out.sparse_codes)  # ReLU codes hold exact zeros
    tuple_out = model(random_ids(2, 7), return_dict=False)
    assert isinstance(tuple_out, tuple) and tuple_out[0].shape == (2, 7, 512)


@pytest.mark.parametrize("variant", ["crate", "crate-alpha", "tost"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(variant):
    ids = random_ids(2, 12)
    results = []
    for checkpointing in (False, True):
        model = tiny_model(variant).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        loss = model(ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for plain, checkpointed in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(plain, checkpointed)


def test_loss_is_shifted_cross_entropy():
    model = tiny_model()
    ids = random_ids(2, 9)
    out = model(ids, labels=ids)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, 512), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)


# ---------------------------------------------------------------------------------------------------- classification


def test_sequence_classification_pools_the_last_real_token():
    torch.manual_seed(0)
    config = config_from_preset("crate-test", num_labels=3, pad_token_id=0)
    model = CrateForSequenceClassification(config).eval()
    short, long = random_ids(1, 5, seed=7), random_ids(1, 8, seed=8)
    with torch.no_grad():
        alone = [model(short).logits, model(long).logits]
        right = torch.cat([torch.cat([short, torch.zeros(1, 3, dtype=torch.long)], 1), long])
        by_pad_id = model(right).logits
        mask = (right != 0).long()
        by_mask = model(right, attention_mask=mask).logits
        left = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
        by_left_mask = model(left, attention_mask=(left != 0).long()).logits
    for logits in (by_pad_id, by_mask, by_left_mask):
        torch.testing.assert_close(logits, torch.cat(alone), rtol=1e-5, atol=1e-5)
    out = model(right, attention_mask=mask, labels=torch.tensor([0, 2]))
    assert out.loss.item() > 0 and out.logits.shape == (2, 3)


def test_trainer_reads_which_heads_divide_by_the_global_item_count(tmp_path):
    """Trainer multiplies the loss by the process count for models whose loss divides by ``num_items_in_batch``;
    the classifiers average over their own batch and must say so, also under PEFT."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    from crate_lm import CrateForImageClassification, CrateVisionConfig

    def accepts_loss_kwargs(model) -> bool:
        args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
        return Trainer(model=model, args=args).model_accepts_loss_kwargs

    classifier = CrateForSequenceClassification(config_from_preset("crate-test", num_labels=2))
    vision = CrateForImageClassification(
        CrateVisionConfig(
            image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_labels=3
        )
    )
    assert not accepts_loss_kwargs(classifier) and not accepts_loss_kwargs(vision)
    assert not accepts_loss_kwargs(get_peft_model(classifier, LoraConfig(r=2, task_type="SEQ_CLS")))
    assert accepts_loss_kwargs(tiny_model())  # its loss does divide by num_items_in_batch
    ids = random_ids(2, 9)
    model = tiny_model()
    summed = model(ids, labels=ids, num_items_in_batch=torch.tensor(4)).loss
    torch.testing.assert_close(summed, model(ids, labels=ids).loss * 16 / 4)  # 2 x 8 predicted tokens


# ---------------------------------------------------------------------------------------------------- save / load


def test_auto_classes_are_registered():
    config = config_from_preset("crate-test")
    assert isinstance(AutoModel.from_config(config), CrateModel)
    assert isinstance(AutoModelForCausalLM.from_config(config), CrateForCausalLM)
    assert isinstance(AutoModelForSequenceClassification.from_config(config), CrateForSequenceClassification)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_save_and_load_give_identical_logits(variant, tmp_path):
    model = tiny_model(variant)
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {"model.safetensors", "config.json", "configuration_crate.py", "modeling_crate.py"} <= files
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map == {  # every head of the family, not only the class saved
        "AutoConfig": "configuration_crate.CrateConfig",
        "AutoModel": "modeling_crate.CrateModel",
        "AutoModelForCausalLM": "modeling_crate.CrateForCausalLM",
        "AutoModelForSequenceClassification": "modeling_crate.CrateForSequenceClassification",
    }
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is CrateForCausalLM
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = random_ids(2, 11)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_tied_weights_survive_resize_token_embeddings(tmp_path):
    model = tiny_model()
    model.resize_token_embeddings(520)
    assert model.config.vocab_size == 520
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.shape == (520, model.config.hidden_size)
    model.save_pretrained(tmp_path)
    loaded = CrateForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = random_ids(1, 6, vocab=520)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


TRUST_REMOTE_CODE_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, sys, torch

    class RefuseCrateLm(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "crate_lm" or name.startswith("crate_lm."):
                raise ImportError("crate_lm is deliberately unavailable in this process")
            return None

    sys.meta_path.insert(0, RefuseCrateLm())
    try:
        import crate_lm  # noqa: F401
        raise SystemExit("crate_lm should not be importable here")
    except ImportError:
        pass

    from transformers import AutoModelForCausalLM
    checkpoint, ids_path, out_path = sys.argv[1:4]
    model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True).eval()
    assert not any(name.startswith("crate_lm") for name in sys.modules)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    with torch.no_grad():
        torch.save(model(torch.load(ids_path)).logits, out_path)
    print(type(model).__module__)
    """
)


# With the official presets' knobs: CRATE-alpha's eps per LayerNorm family and fan-in d, ToST's missing biases, a
# padded table (500 -> 512 rows) and no final LN.
OFFICIAL_KNOBS = {
    "crate-alpha": {"layer_norm_eps": 1e-6, "final_layer_norm_eps": 1e-5, "ista_dictionary_fan_in": "hidden_size"},
    "tost": {"layer_norm_bias": False, "mlp_bias": False, "attention_out_bias": False, "final_layer_norm": False},
}


@pytest.mark.parametrize("variant", ["crate-alpha", "tost"])
def test_checkpoint_loads_with_trust_remote_code_without_this_package(variant, tmp_path):
    model = tiny_model(variant, vocab_size=500, vocab_pad_multiple=64, **OFFICIAL_KNOBS[variant])
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    ids = random_ids(2, 9, vocab=500)
    torch.save(ids, tmp_path / "ids.pt")
    script = tmp_path / "load.py"
    script.write_text(TRUST_REMOTE_CODE_SCRIPT)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, str(script), str(checkpoint), str(tmp_path / "ids.pt"), str(tmp_path / "logits.pt")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "logits.pt"), model(ids).logits)


def test_text_generation_pipeline_on_a_checkpoint_with_gpt2_tokenizer(gpt2_ranks_path, tmp_path):
    from transformers import pipeline

    from crate_lm.tokenization import gpt2_tokenizer_from_tiktoken

    torch.manual_seed(0)
    model = CrateForCausalLM(  # the table padded to 50304 rows, as the published presets
        config_from_preset(
            "crate-test", vocab_size=50257, vocab_pad_multiple=64, bos_token_id=50256, eos_token_id=50256
        )
    ).eval()
    model.save_pretrained(tmp_path)
    gpt2_tokenizer_from_tiktoken(gpt2_ranks_path).save_pretrained(tmp_path)
    generator = pipeline("text-generation", model=str(tmp_path))
    text = generator("Hello world,", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert text.startswith("Hello world,") and len(text) > len("Hello world,")


def test_package_exports():
    assert crate_lm.CrateConfig.model_type == "crate"
    assert "causal-crate-base" in preset_names()


@pytest.mark.parametrize("variant", ["crate", "crate-alpha", "tost"])
def test_bfloat16_forward_and_generation_stay_finite(variant):
    model = tiny_model(variant).to(torch.bfloat16)
    ids = random_ids(2, 70)  # > 2d tokens: the fused ISTA path in bf16 too
    with torch.no_grad():
        logits = model(ids[:, :60]).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    reference = tiny_model(variant)(ids[:, :60]).logits
    assert (logits.float() - reference).abs().max() < 0.25
    generated = model.generate(ids[:, :8], max_new_tokens=4, do_sample=False)
    assert generated.shape == (2, 12)


def test_generation_from_inputs_embeds_matches_input_ids():
    model = tiny_model()
    ids = random_ids(1, 6)
    from_ids = model.generate(ids, max_new_tokens=5, do_sample=False)
    embeds = model.get_input_embeddings()(ids)
    from_embeds = model.generate(
        inputs_embeds=embeds, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False
    )
    assert torch.equal(from_embeds[0, -5:], from_ids[0, -5:])


@pytest.mark.parametrize("variant", ["crate", "tost"])
def test_initialisation_scales_residual_outputs_by_depth(variant):
    torch.manual_seed(0)
    config = config_from_preset("crate-tiny", num_hidden_layers=8, hidden_size=256, **VARIANTS[variant])
    layer = CrateForCausalLM(config).model.layers[3]
    residual_std = 0.02 / (2 * 8) ** 0.5
    outputs = [layer.attention.out_proj] + ([layer.mlp.fc_out] if variant == "tost" else [])
    for linear in outputs:
        assert linear.weight.std().item() == pytest.approx(residual_std, rel=0.05)
        if linear.bias is not None:
            assert linear.bias.abs().max() == 0
    assert layer.attention.subspace_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    if variant == "crate":
        bound = (6 / config.dictionary_size) ** 0.5  # Kaiming-uniform, a = 0, fan-in = dictionary width
        assert layer.ista.dictionary.abs().max() <= bound
        assert layer.ista.dictionary.std().item() == pytest.approx(bound / 3**0.5, rel=0.05)
    else:
        assert torch.equal(layer.attention.temperature, torch.ones(config.num_attention_heads))
        assert torch.equal(layer.attention_scale.scale, torch.full((256,), config.layer_scale_init))


def test_attention_mask_of_the_wrong_length_is_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="attention_mask covers 5 positions"):
        model(random_ids(1, 6), attention_mask=torch.ones(1, 5, dtype=torch.long))
