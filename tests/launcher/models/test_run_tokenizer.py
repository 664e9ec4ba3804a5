"""The run's tokenizer: gpt2, an HF directory, or bpe:N trained once on the run's own text and reused."""

import json

import pytest

from data_pipeline.spec import parse_text_data
from launcher.models.tokenizers import load_tokenizer, prepare_tokenizer, trained_tokenizer_dir


def test_bpe_is_trained_on_the_runs_text_once_then_reused(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    words = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "while", "the", "cat", "sleeps"]
    corpus.write_text(
        "".join(json.dumps({"text": " ".join(words[i:] + words[:i]) * 20}) + "\n" for i in range(len(words)))
    )
    spec = parse_text_data({"sources": [{"path": str(corpus)}], "min_shards": 1, "streams_per_rank": 1})
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=r"tokenizer: 'bpe:300' has not been trained for this run yet"):
        load_tokenizer("bpe:300", output_dir=run)
    trained_tokenizer_dir(run).mkdir(parents=True)  # an empty tokenizer/ is trained into
    prepare_tokenizer("bpe:300", run, spec)
    saved = trained_tokenizer_dir(run) / "tokenizer.json"
    stamp = saved.stat().st_mtime_ns
    tokenizer = load_tokenizer("bpe:300", output_dir=run)
    assert 257 < len(tokenizer) <= 300 and tokenizer.eos_token_id == 0
    assert len(tokenizer("the quick brown fox").input_ids) < len("the quick brown fox")  # merges were learned
    prepare_tokenizer("bpe:300", run, spec)  # a resumed run reuses it (its ids must not change)
    assert saved.stat().st_mtime_ns == stamp
    assert not [p for p in run.iterdir() if p.name.startswith(".tokenizer-")]  # no scratch left behind


def test_unknown_tokenizer_is_a_one_line_error(tmp_path):
    with pytest.raises(ValueError, match="neither 'gpt2', bpe:N nor a directory"):
        load_tokenizer(str(tmp_path / "nothing"))


def test_a_tokenizer_directory_without_tokenizer_files_is_a_one_line_error(tmp_path):
    """Not transformers' traceback: the directory and what it lacks, for a configured directory and for a run's
    own tokenizer/ (bpe:N), which is neither trained over nor loaded."""
    from launcher.errors import ConfigError

    given = tmp_path / "given"
    given.mkdir()
    (given / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ConfigError) as error:
        load_tokenizer(str(given))
    assert str(error.value) == (
        f"tokenizer: {given} holds no tokenizer files "
        "(none of tokenizer.json, vocab.json + merges.txt, vocab.txt, tokenizer.model)"
    )
    run = tmp_path / "run"
    saved = trained_tokenizer_dir(run)
    saved.mkdir(parents=True)
    (saved / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ConfigError, match=f"^tokenizer: 'bpe:300' has not been trained for this run yet \\({saved}/"):
        load_tokenizer("bpe:300", output_dir=run)
    with pytest.raises(ConfigError) as error:
        prepare_tokenizer("bpe:300", run, None)
    assert str(error.value) == (
        f"tokenizer: 'bpe:300' is trained into {saved}, which exists without tokenizer.json; move it away "
        f"(a new one is trained), or set tokenizer: {saved} if it holds a tokenizer"
    )
    assert [p.name for p in saved.iterdir()] == ["tokenizer_config.json"]


def test_a_trained_bpe_is_cached_by_its_training_text(tmp_path, monkeypatch):
    """The second run on the same text copies the cached tokenizer (the same ids) instead of training; changed text
    trains a new one."""
    monkeypatch.setenv("CRATE_CACHE_DIR", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"alpha beta gamma {i} delta"}) + "\n" for i in range(200)))
    spec = parse_text_data({"sources": [{"path": str(corpus)}], "min_shards": 1, "streams_per_rank": 1})
    prepare_tokenizer("bpe:300", tmp_path / "first", spec)
    cached = list((tmp_path / "cache" / "tokenizers").iterdir())
    assert [path.name.startswith("bpe-300-") for path in cached] == [True]
    (cached[0] / "tokenizer.json").write_text((cached[0] / "tokenizer.json").read_text().replace("alpha", "ALPHA"))
    prepare_tokenizer("bpe:300", tmp_path / "second", spec)  # copied from the cache: it carries the marker
    assert "ALPHA" in (trained_tokenizer_dir(tmp_path / "second") / "tokenizer.json").read_text()
    corpus.write_text(corpus.read_text() + json.dumps({"text": "epsilon"}) + "\n")
    prepare_tokenizer("bpe:300", tmp_path / "third", spec)  # other text: trained afresh, a second cache entry
    assert "ALPHA" not in (trained_tokenizer_dir(tmp_path / "third") / "tokenizer.json").read_text()
    assert len(list((tmp_path / "cache" / "tokenizers").iterdir())) == 2
