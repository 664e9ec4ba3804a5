"""``crate generate``: text from an exported model, through ``transformers.pipeline("text-generation")`` — the same
path any HF user takes, so it also checks that the export is a complete HF model."""

from __future__ import annotations

from pathlib import Path

from launcher.errors import InputError, MissingInputError


def generate(
    model_dir: str, prompt: str, max_new_tokens: int = 60, num_samples: int = 1, seed: int = 0, temperature: float = 0.8
) -> list[str]:
    if not (Path(model_dir) / "config.json").is_file():
        raise MissingInputError(f"{model_dir}: no config.json (export a run first: crate export RUN_DIR)")
    if max_new_tokens < 1 or num_samples < 1 or temperature < 0:
        raise InputError("--max-new-tokens and --num-samples must be >= 1 and --temperature >= 0")
    from transformers import pipeline, set_seed

    import crate_lm  # noqa: F401  (registers the CRATE Auto classes; remote code is not needed)

    set_seed(seed)
    generator = pipeline("text-generation", model=model_dir, device="cpu")
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 50} if temperature > 0 else {"do_sample": False}
    outputs = generator(
        prompt,
        max_new_tokens=max_new_tokens,
        num_return_sequences=num_samples,
        pad_token_id=generator.tokenizer.eos_token_id,
        **sampling,
    )
    return [output["generated_text"] for output in outputs]
