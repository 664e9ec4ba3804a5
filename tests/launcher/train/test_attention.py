"""The training path's attention calls are the ones flash attention serves (``launcher.train.attention``): SDPA
with ``is_causal=True``, no mask, a head size flash takes. Checked on the CPU by recording the real calls; that the
CUDA flash kernel then runs is ``test_gpu.py``'s."""

import pytest
import torch
import torch.nn.functional as F

from tests.launcher.train.attention_models import SDPA_MODELS, SEQ_LEN, VOCAB, tiny_text_model

FLASH_MAX_HEAD_DIM = 256


@pytest.mark.parametrize(("arch", "preset"), SDPA_MODELS)
def test_the_training_forward_calls_causal_sdpa_without_a_mask(arch, preset, monkeypatch):
    calls, real = [], F.scaled_dot_product_attention

    def recording(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        calls.append({"mask": attn_mask, "is_causal": is_causal, "head_dim": query.shape[-1]})
        return real(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    torch.manual_seed(0)
    model = tiny_text_model(arch, preset)
    ids = torch.randint(0, VOCAB, (2, SEQ_LEN))
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    assert len(calls) == model.config.num_hidden_layers
    for call in calls:
        assert call["mask"] is None and call["is_causal"]
        assert call["head_dim"] % 8 == 0 and call["head_dim"] <= FLASH_MAX_HEAD_DIM
