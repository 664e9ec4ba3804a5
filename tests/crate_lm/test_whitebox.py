"""Tests of crate_lm.whitebox: the rate / sparsity formulas and the per-layer measures of CRATE, ToST and GPT-2."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from crate_lm import CrateForCausalLM, config_from_preset
from crate_lm.configuration_crate import VARIANT_KNOBS
from crate_lm.whitebox import (
    coding_rate,
    compression_rate,
    full_rate,
    hoyer_sparsity,
    measure,
    measure_crate,
    membership_entropy,
    rate_reduction,
    sparsity_l0,
)

EPS_SQ = 0.01
KEYS = {"layer", "rc", "rc_std", "rc_per_head", "rate", "delta_r", "sparsity_l0", "hoyer"}


def direct_rate(z: torch.Tensor, eps_sq: float = EPS_SQ) -> float:
    """The textbook formula on the d x d side, float64, via slogdet."""
    z = z.to(torch.float64)
    n, d = z.shape
    matrix = torch.eye(d, dtype=torch.float64) + d / (n * eps_sq) * z.T @ z
    sign, logabsdet = torch.linalg.slogdet(matrix)
    assert sign > 0
    return 0.5 * logabsdet.item()


def unit(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return x / x.norm(dim=-1, keepdim=True)


# --- formulas ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, d", [(5, 12), (40, 7), (9, 9)])
def test_coding_rate_matches_direct_formula(n, d):
    torch.manual_seed(0)
    z = torch.randn(3, n, d)
    got = coding_rate(z, EPS_SQ)
    assert got.shape == (3,) and got.dtype == torch.float64
    for b in range(3):
        assert got[b].item() == pytest.approx(direct_rate(z[b]), rel=1e-10)
    # Both sides: the N x N Gram formula gives the same number.
    zb = z[0].double()
    gram_side = 0.5 * torch.logdet(torch.eye(n, dtype=torch.float64) + d / (n * EPS_SQ) * zb @ zb.T).item()
    assert got[0].item() == pytest.approx(gram_side, rel=1e-10)


def test_coding_rate_num_tokens_matches_dropping_zero_rows():
    torch.manual_seed(1)
    z = torch.randn(6, 4)
    padded = torch.cat([z, torch.zeros(10, 4)])  # now N = 16 > d, and the d x d side is used
    assert coding_rate(padded, EPS_SQ, num_tokens=6).item() == pytest.approx(direct_rate(z), rel=1e-10)
    z = torch.randn(3, 8)
    padded = torch.cat([z, torch.zeros(2, 8)])  # N = 5 < d: the Gram side, with zero rows
    assert coding_rate(padded, EPS_SQ, num_tokens=3).item() == pytest.approx(direct_rate(z), rel=1e-10)


def test_compression_rate_is_sum_of_head_rates_on_unit_tokens():
    torch.manual_seed(2)
    w = torch.randn(2, 3, 10, 4)
    rc = compression_rate(w, EPS_SQ)
    assert rc.shape == (2, 3)
    for b in range(2):
        for k in range(3):
            assert rc[b, k].item() == pytest.approx(direct_rate(unit(w[b, k])), rel=1e-10)
    # R on the concatenated unit head vectors, width d = K p.
    rate = full_rate(w, EPS_SQ)
    concatenated = unit(w).transpose(1, 2).reshape(2, 10, 12)
    for b in range(2):
        assert rate[b].item() == pytest.approx(direct_rate(concatenated[b]), rel=1e-10)
    assert torch.allclose(rate_reduction(w, EPS_SQ), rate - rc.sum(-1))
    # Scale-free per token: rescaling tokens changes nothing.
    scales = torch.rand(2, 3, 10, 1) + 0.1
    assert torch.allclose(compression_rate(w * scales, EPS_SQ), rc)


def test_compression_rate_random_exceeds_low_dimensional():
    torch.manual_seed(3)
    batch, heads, tokens, p = 4, 3, 64, 16
    random_tokens = torch.randn(batch, heads, tokens, p)
    basis = torch.linalg.qr(torch.randn(heads, p, 2)).Q  # a 2-dimensional subspace per head
    low_dim = torch.randn(batch, heads, tokens, 2) @ basis.transpose(-1, -2)[None]
    rc_random = compression_rate(random_tokens, EPS_SQ)
    rc_low = compression_rate(low_dim, EPS_SQ)
    assert (rc_random > rc_low).all()
    assert (rc_random.sum(-1) > 2 * rc_low.sum(-1)).all()
    # Rank 2 bounds each head's rate: 2 eigenvalues, each at most 1 + p N / (N eps^2) (unit tokens).
    assert (rc_low <= math.log(1 + p / EPS_SQ) + 1e-9).all()


def test_one_head_compression_equals_full_rate():
    torch.manual_seed(4)
    w = torch.randn(3, 1, 20, 8)
    mask = torch.ones(3, 20, dtype=torch.bool)
    mask[1, 15:] = False
    for token_mask in (None, mask):
        rc = compression_rate(w, EPS_SQ, token_mask)[:, 0]
        assert torch.allclose(rc, full_rate(w, EPS_SQ, token_mask), rtol=1e-12)
        assert torch.allclose(rate_reduction(w, EPS_SQ, token_mask), torch.zeros(3, dtype=torch.float64), atol=1e-9)


def test_compression_rate_mask_equals_running_alone():
    torch.manual_seed(5)
    w = torch.randn(2, 2, 12, 4)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[0, :5] = False  # left padding
    mask[1, 9:] = False  # right padding
    rc = compression_rate(w, EPS_SQ, mask)
    assert torch.allclose(rc[0], compression_rate(w[:1, :, 5:], EPS_SQ)[0], rtol=1e-12)
    assert torch.allclose(rc[1], compression_rate(w[1:, :, :9], EPS_SQ)[0], rtol=1e-12)
    assert not torch.allclose(rc, compression_rate(w, EPS_SQ))


def test_sparsity_l0_exact():
    codes = torch.tensor(
        [
            [[0.0, 1e-7, 0.0, -2.0], [0.0, 0.0, 0.0, 0.0], [3.0, 1.0, 1.0, 1.0]],  # 2 + 0 + 4 = 6 of 12
            [[0.0, 0.0, 0.0, 5.0], [1.0, 0.0, 0.0, 0.0], [7.0, 7.0, 7.0, 7.0]],  # 1 + 1 + 4 = 6 of 12; masked: 2 of 8
        ]
    )
    assert torch.allclose(sparsity_l0(codes), torch.tensor([0.5, 0.5], dtype=torch.float64))
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    assert torch.allclose(sparsity_l0(codes, mask), torch.tensor([0.5, 0.25], dtype=torch.float64))
    assert sparsity_l0(codes[0]).item() == pytest.approx(0.5)


def test_hoyer_sparsity():
    n = 16
    one_hot = torch.zeros(1, 1, n)
    one_hot[..., 3] = -2.5
    constant = torch.full((1, 1, n), 0.7)
    assert hoyer_sparsity(one_hot).item() == pytest.approx(1.0)
    assert hoyer_sparsity(constant).item() == pytest.approx(0.0, abs=1e-12)
    half = torch.zeros(1, 1, n)
    half[..., : n // 4] = 1.0  # l1/l2 = sqrt(n/4) = 2: (4 - 2) / 3
    assert hoyer_sparsity(half).item() == pytest.approx(2 / 3)
    # All-zero tokens are finite (counted as maximally sparse); the mask drops tokens from the mean.
    mixed = torch.stack([constant[0, 0], torch.zeros(n)])[None]
    assert hoyer_sparsity(mixed).item() == pytest.approx(0.5)
    assert hoyer_sparsity(mixed, torch.tensor([[1, 0]])).item() == pytest.approx(0.0, abs=1e-12)


def test_membership_entropy():
    heads, tokens = 4, 5
    uniform = torch.full((2, heads, tokens), 1 / heads)
    one_hot = torch.zeros(2, heads, tokens)
    one_hot[:, 1] = 1.0
    assert torch.allclose(membership_entropy(uniform), torch.full((2,), math.log(heads), dtype=torch.float64))
    assert torch.allclose(membership_entropy(one_hot), torch.zeros(2, dtype=torch.float64))
    mixed = torch.cat([uniform[:, :, :2], one_hot[:, :, 2:]], dim=-1)
    assert torch.allclose(
        membership_entropy(mixed, torch.tensor([[1, 1, 0, 0, 0]] * 2)),
        torch.full((2,), math.log(heads), dtype=torch.float64),
    )


# --- whole models -----------------------------------------------------------------------------------------------------

VARIANTS = VARIANT_KNOBS


def crate_model(variant: str) -> CrateForCausalLM:
    torch.manual_seed(0)
    return CrateForCausalLM(config_from_preset("crate-test", **VARIANTS[variant]))


def gpt2_model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(
        GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=512, n_positions=64, bos_token_id=0, eos_token_id=0)
    )


def check_records(records, layers: int, heads: int, tost: bool = False):
    assert [r["layer"] for r in records] == list(range(layers))
    for record in records:
        assert set(record) == KEYS | ({"pi_entropy"} if tost else set())
        for key in KEYS - {"layer", "rc_per_head"}:
            assert math.isfinite(record[key]), (key, record)
        assert record["rc"] > 0 and record["rate"] > 0 and record["rc_std"] >= 0
        assert len(record["rc_per_head"]) == heads
        assert sum(record["rc_per_head"]) == pytest.approx(record["rc"])
        assert record["delta_r"] == pytest.approx(record["rate"] - record["rc"])
        assert 0.0 <= record["sparsity_l0"] <= 1.0
        assert 0.0 <= record["hoyer"] <= 1.0
        if tost:
            assert 0.0 <= record["pi_entropy"] <= math.log(heads) + 1e-9


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_measure_crate_variants(variant):
    model = crate_model(variant)
    model.train()
    input_ids = torch.randint(0, 512, (3, 24), generator=torch.Generator().manual_seed(0))
    records = measure(model, input_ids)
    assert model.training  # mode restored
    check_records(records, layers=2, heads=4, tost=variant == "tost")
    # The measured tensors are the model's own: check layer 0 against its outputs.
    model.eval()
    with torch.no_grad():
        out = model(input_ids, output_sparse_codes=True)
    width = 4 * 32 if variant == "tost" else model.config.dictionary_size
    assert out.sparse_codes[0].shape[-1] == width
    rc = compression_rate(out.subspace_projections[0], EPS_SQ).sum(-1)
    assert records[0]["rc"] == pytest.approx(rc.mean().item(), rel=1e-9)
    assert records[0]["sparsity_l0"] == pytest.approx(sparsity_l0(out.sparse_codes[0]).mean().item(), rel=1e-9)
    if variant in ("crate", "crate-lm", "crate-alpha"):
        assert records[0]["sparsity_l0"] < 1.0  # ReLU codes have exact zeros


@pytest.mark.parametrize("variant", ["crate", "crate-lm", "tost"])
def test_measure_crate_padding_equals_alone(variant):
    model = crate_model(variant).eval()
    generator = torch.Generator().manual_seed(1)
    first = torch.randint(1, 512, (1, 20), generator=generator)
    second = torch.randint(1, 512, (1, 13), generator=generator)
    third = torch.randint(1, 512, (1, 9), generator=generator)

    def pad(ids, left):
        zeros = torch.zeros(1, 20 - ids.shape[1], dtype=ids.dtype)
        return torch.cat([zeros, ids] if left else [ids, zeros], 1)

    input_ids = torch.cat([first, pad(second, left=True), pad(third, left=False)])
    attention_mask = torch.zeros(3, 20, dtype=torch.long)
    attention_mask[0] = 1
    attention_mask[1, 7:] = 1
    attention_mask[2, :9] = 1
    batched = measure(model, input_ids, attention_mask)
    alone = [measure(model, ids) for ids in (first, second, third)]
    keys = ["rc", "rate", "delta_r", "sparsity_l0", "hoyer"] + (["pi_entropy"] if variant == "tost" else [])
    for layer, record in enumerate(batched):
        for key in keys:
            values = torch.tensor([a[layer][key] for a in alone], dtype=torch.float64)
            assert record[key] == pytest.approx(values.mean().item(), rel=1e-4, abs=1e-6), (layer, key)
        rcs = torch.tensor([a[layer]["rc"] for a in alone], dtype=torch.float64)
        assert record["rc_std"] == pytest.approx(rcs.std(correction=0).item(), rel=1e-3, abs=1e-5)
        heads = torch.tensor([a[layer]["rc_per_head"] for a in alone], dtype=torch.float64).mean(0)
        assert torch.allclose(torch.tensor(record["rc_per_head"], dtype=torch.float64), heads, rtol=1e-4)
    # Ignoring the mask would count the padding: the values differ.
    unmasked = measure(model, input_ids)
    assert unmasked[0]["rc"] != pytest.approx(batched[0]["rc"], rel=1e-4)


def test_measure_gpt2():
    model = gpt2_model().train()
    input_ids = torch.randint(0, 512, (3, 24), generator=torch.Generator().manual_seed(0))
    records = measure(model, input_ids)
    check_records(records, layers=2, heads=4)
    assert model.training  # mode restored
    # No hook is left behind.
    for block in model.transformer.h:
        assert not block.attn.c_attn._forward_hooks and not block.mlp.act._forward_hooks
    # Layer 0's query, recomputed by hand.
    with torch.no_grad():
        block = model.transformer.h[0]
        positions = torch.arange(24)[None]
        x = block.ln_1(model.transformer.wte(input_ids) + model.transformer.wpe(positions))
        q = block.attn.c_attn(x)[..., :32].reshape(3, 24, 4, 8).transpose(1, 2)
    assert records[0]["rc"] == pytest.approx(compression_rate(q, EPS_SQ).sum(-1).mean().item(), rel=1e-6)
    # Right and left padding: equal to the samples alone.
    short = input_ids[1:2, :10]
    zeros = torch.zeros(1, 14, dtype=short.dtype)
    alone = [measure(model, input_ids[:1]), measure(model, short)]
    for left in (False, True):
        padded = torch.cat([input_ids[:1], torch.cat([zeros, short] if left else [short, zeros], 1)])
        mask = torch.ones(2, 24, dtype=torch.long)
        if left:
            mask[1, :14] = 0
        else:
            mask[1, 10:] = 0
        batched = measure(model, padded, mask)
        for layer in range(2):
            for key in ("rc", "rate", "sparsity_l0", "hoyer"):
                expected = (alone[0][layer][key] + alone[1][layer][key]) / 2
                assert batched[layer][key] == pytest.approx(expected, rel=1e-4), (left, layer, key)


def test_measure_llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config).train()
    input_ids = torch.randint(0, 512, (3, 24), generator=torch.Generator().manual_seed(0))
    records = measure(model, input_ids)
    check_records(records, layers=2, heads=4)
    assert model.training
    for layer in model.model.layers:
        assert not layer.self_attn.q_proj._forward_hooks and not layer.mlp.down_proj._forward_pre_hooks
    with torch.no_grad():  # layer 0's query (before the rotary embedding) and its SwiGLU code, by hand
        layer = model.model.layers[0]
        x = layer.input_layernorm(model.model.embed_tokens(input_ids))
        q = layer.self_attn.q_proj(x).reshape(3, 24, 4, 8).transpose(1, 2)
    assert records[0]["rc"] == pytest.approx(compression_rate(q, EPS_SQ).sum(-1).mean().item(), rel=1e-6)
    # Right padding: equal to the samples alone.
    short = input_ids[1:2, :10]
    padded = torch.cat([input_ids[:1], torch.cat([short, torch.zeros(1, 14, dtype=short.dtype)], 1)])
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, 10:] = 0
    alone = [measure(model, input_ids[:1]), measure(model, short)]
    for layer_index, record in enumerate(measure(model, padded, mask)):
        expected = (alone[0][layer_index]["rc"] + alone[1][layer_index]["rc"]) / 2
        assert record["rc"] == pytest.approx(expected, rel=1e-4)


def test_gpt2_hooks_removed_on_error():
    model = gpt2_model()
    with pytest.raises(IndexError):
        measure(model, torch.full((1, 4), 10_000))  # out of the vocabulary: the embedding lookup fails
    for block in model.transformer.h:
        assert not block.attn.c_attn._forward_hooks and not block.mlp.act._forward_hooks


def test_measure_restores_eval_mode_and_rejects_empty_samples():
    model = crate_model("crate").eval()
    measure_crate(model, torch.randint(0, 512, (1, 8)))
    assert not model.training
    with pytest.raises(ValueError, match="non-padding"):
        measure(model, torch.randint(0, 512, (2, 8)), torch.tensor([[1] * 8, [0] * 8]))


def test_dispatcher_rejects_other_models():
    other = torch.nn.Linear(2, 2)
    other.config = SimpleNamespace(model_type="bert")
    with pytest.raises(ValueError, match="'bert'"):
        measure(other, torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="None"):
        measure(torch.nn.Linear(2, 2), torch.zeros(1, 4, dtype=torch.long))
