"""Byte-level BPE tokenizers for CRATE language models, as ``transformers`` fast tokenizers.

Two builders, both returning a :class:`transformers.PreTrainedTokenizerFast` that
round-trips through ``save_pretrained`` / ``AutoTokenizer.from_pretrained``:

* :func:`gpt2_tokenizer_from_tiktoken` rebuilds GPT-2's exact tokenizer from a
  tiktoken rank file (e.g. ``gpt2.tiktoken`` as shipped by ``openai-whisper``).
  This gives the standard GPT-2 vocabulary without access to the Hugging Face Hub.
* :func:`train_bpe_tokenizer` trains a fresh byte-level BPE on local text files,
  for small experiments where a 50k vocabulary would dominate the parameter count.

Both use the GPT-2 pipeline: the GPT-2 pre-tokenization regex, byte-to-unicode
mapping (so every byte string is representable and decoding is lossless), no
prefix space, and a single special token ``<|endoftext|>`` that serves as BOS,
EOS and UNK. Neither tokenizer adds special tokens when encoding.

Special-token choices:

* Padding token: left unset, as in upstream GPT-2. Callers that batch with
  padding should set ``tokenizer.pad_token = tokenizer.eos_token`` (and mask
  padded positions) explicitly, so that padding is never silently confused
  with a real end of text.
* ``<|endoftext|>`` id: 50256 (the last id) for GPT-2, as upstream; 0 for trained
  tokenizers, where the ``tokenizers`` trainer places special tokens first, which
  keeps the id independent of ``vocab_size``. Use ``tokenizer.eos_token_id``
  rather than hard-coding either.

This module only takes paths; fetching data is ``data_pipeline``'s job.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import functools
import os
from collections.abc import Sequence
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

__all__ = [
    "ENDOFTEXT",
    "GPT2_MODEL_MAX_LENGTH",
    "bytes_to_unicode",
    "gpt2_tokenizer_from_tiktoken",
    "train_bpe_tokenizer",
]

ENDOFTEXT = "<|endoftext|>"
GPT2_MODEL_MAX_LENGTH = 1024
_NUM_BYTES = 256


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from byte values to printable unicode characters.

    Printable Latin-1 bytes map to themselves; the remaining 68 (control
    characters, space, NBSP, soft hyphen) map, in byte order, to ``chr(256)``
    onwards, so that e.g. a space becomes ``"Ġ"``. This is also the alphabet
    ``pre_tokenizers.ByteLevel`` uses.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    shifted = (b for b in range(_NUM_BYTES) if b not in mapping)
    for offset, b in enumerate(shifted):
        mapping[b] = chr(_NUM_BYTES + offset)
    return mapping


def _bytes_to_token(data: bytes) -> str:
    table = bytes_to_unicode()
    return "".join(table[b] for b in data)


def gpt2_tokenizer_from_tiktoken(ranks_path: str | os.PathLike[str]) -> PreTrainedTokenizerFast:
    """Rebuild GPT-2's byte-level BPE tokenizer from a tiktoken rank file.

    Each line of the file is ``<base64 token bytes> <rank>``; ranks must be
    ``0..n-1`` with every single byte present. The rank becomes the token id and
    ``<|endoftext|>`` is appended as id ``n`` (50256 for GPT-2, giving 50257
    tokens). The BPE merge list is recovered from the ranks (see
    :func:`_merges_from_ranks`), reproducing GPT-2's 50,000 merges.
    """
    ranks = _load_tiktoken_ranks(Path(ranks_path))
    vocab = {_bytes_to_token(token): rank for token, rank in ranks.items()}
    merges = [(_bytes_to_token(a), _bytes_to_token(b)) for a, b in _merges_from_ranks(ranks)]

    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    _set_byte_level_pipeline(backend)
    backend.add_special_tokens([AddedToken(ENDOFTEXT, special=True, normalized=False)])
    assert backend.token_to_id(ENDOFTEXT) == len(ranks)
    return _wrap(backend, GPT2_MODEL_MAX_LENGTH)


def train_bpe_tokenizer(
    files: Sequence[str | os.PathLike[str]],
    vocab_size: int,
    min_frequency: int = 2,
    *,
    model_max_length: int = GPT2_MODEL_MAX_LENGTH,
) -> PreTrainedTokenizerFast:
    """Train a GPT-2-style byte-level BPE tokenizer on UTF-8 text files.

    The vocabulary is ``<|endoftext|>`` (id 0), the 256 byte symbols, then
    learned merges up to ``vocab_size`` tokens in total (fewer if the corpus
    runs out of pairs seen at least ``min_frequency`` times).
    """
    paths = [Path(f) for f in files]
    if not paths:
        raise ValueError("files: expected at least one training file")
    for path in paths:
        if not path.is_file():
            raise ValueError(f"files: no such file: {path}")
    min_vocab = _NUM_BYTES + 1
    if vocab_size < min_vocab:
        raise ValueError(f"vocab_size: must be >= {min_vocab} (256 bytes + {ENDOFTEXT}), got {vocab_size}")
    if min_frequency < 1:
        raise ValueError(f"min_frequency: must be >= 1, got {min_frequency}")

    backend = Tokenizer(models.BPE(fuse_unk=False, byte_fallback=False))
    _set_byte_level_pipeline(backend)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[AddedToken(ENDOFTEXT, special=True, normalized=False)],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen in the corpus or not
        show_progress=False,
    )
    try:
        backend.train([str(p) for p in paths], trainer)
    except Exception as exc:
        # tokenizers raises a bare Exception (e.g. on invalid UTF-8) that does not name the file.
        bad = _first_non_utf8(paths)
        if bad is None:
            raise
        raise ValueError(f"files: not valid UTF-8 text: {bad}") from exc
    return _wrap(backend, model_max_length)


def _first_non_utf8(paths: Sequence[Path]) -> Path | None:
    """Return the first file that is not valid UTF-8, streaming so large corpora are not loaded whole."""
    for path in paths:
        decoder = codecs.getincrementaldecoder("utf-8")()
        try:
            with path.open("rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    decoder.decode(chunk)
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            return path
    return None


def _load_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """Parse a tiktoken rank file into ``{token bytes: rank}``, validating its shape."""
    if not path.is_file():
        raise ValueError(f"ranks_path: no such file: {path}")
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(path.read_text(encoding="ascii").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            encoded, rank = line.split()
            ranks[base64.b64decode(encoded, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise ValueError(f"ranks_path: malformed line {lineno} in {path}: {line[:80]!r}") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"ranks_path: ranks in {path} are not unique and contiguous from 0")
    missing = [b for b in range(_NUM_BYTES) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"ranks_path: {path} lacks {len(missing)} single-byte tokens (e.g. byte {missing[0]})")
    return ranks


def _merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Recover the ordered BPE merge list implied by tiktoken ranks.

    A tiktoken rank table is a BPE merge table in disguise: the token of rank r
    is created by the r-th merge. Running BPE on its bytes with only the tokens
    of lower rank stops exactly one merge short, at the pair that produced it.
    Merges are returned in rank order, i.e. in priority order for ``models.BPE``.
    """
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = _bpe(ranks, token, max_rank=rank)
        if len(parts) != 2:
            raise ValueError(f"ranks_path: token of rank {rank} ({token!r}) is not a merge of two lower-ranked tokens")
        merges.append((parts[0], parts[1]))
    return merges


def _bpe(ranks: dict[bytes, int], data: bytes, max_rank: int) -> list[bytes]:
    """Byte-pair encode ``data`` using only tokens of rank below ``max_rank``; return the pieces."""
    parts = [bytes([b]) for b in data]
    while len(parts) > 1:
        best_rank, best_index = max_rank, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1], max_rank)
            if rank < best_rank:
                best_rank, best_index = rank, i
        if best_index < 0:
            break
        parts[best_index : best_index + 2] = [parts[best_index] + parts[best_index + 1]]
    return parts


def _set_byte_level_pipeline(backend: Tokenizer) -> None:
    """Install GPT-2's byte-level pre-tokenizer (with its regex), decoder and post-processor."""
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)


def _wrap(backend: Tokenizer, model_max_length: int) -> PreTrainedTokenizerFast:
    """Wrap a ``tokenizers.Tokenizer`` with ``<|endoftext|>`` as BOS/EOS/UNK and no pad token."""
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=ENDOFTEXT,
        eos_token=ENDOFTEXT,
        unk_token=ENDOFTEXT,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,  # keep decode(encode(x)) == x
    )
