"""Data a stream can never make a block or an image of, with the one-line error each must give, in bounded time:
shared by the tests of the streams and of ``crate data inspect``."""

from __future__ import annotations

import gzip
import json
import random
import re
from pathlib import Path

NEVER_SPIN_SECONDS = 10  # each case takes well under a second; a regression that loops fails its timeout
SEQ_LEN = 64
UNUSABLE_TEXT = (
    "records-without-the-text-field",
    "invalid-json",
    "shorter-than-a-block",
    "empty-file",
    "random-bytes-named-gz-read-as-jsonl",
    "random-bytes-named-gz-format-inferred",
    "gzip-read-as-jsonl",
)


def unusable_text(root: Path, name: str) -> tuple[dict, str, str]:
    """``(data section, error class name, regex of the message)`` of case ``name``, its file written in ``root``."""
    path = root / ("corrupt.jsonl.gz" if name.startswith("random-bytes") else f"{name}.jsonl")
    source: dict = {"path": str(path)}
    where = re.escape(str(path))
    if name == "records-without-the-text-field":
        path.write_text("".join(json.dumps({"body": f"record {i}"}) + "\n" for i in range(50)))
        expected = (
            "BadDataError",
            r"found no usable block \(50 bad records \{'missing_text_field': 50\}; records without the field 'text' "
            rf"\(data.sources\[0\].text_field\); worst file {where}: \['line 1: missing_text_field'",
        )
    elif name == "invalid-json":
        path.write_text("{not json\n" * 300)
        expected = ("BadDataError", rf"300 bad records \{{'invalid_json': 300\}}; worst file {where}: \['line 1: ")
    elif name == "shorter-than-a-block":
        path.write_text(json.dumps({"text": "a few words only"}) + "\n")
        expected = (
            "BadDataError",
            rf"{where}': stream 0 read all its 1 shards and found no usable block \(1 documents of \d+ tokens in "
            rf"all, and no shard holds one block of data.seq_len={SEQ_LEN} tokens",
        )
    elif name == "empty-file":
        path.write_text("")
        expected = ("BadDataError", rf"{where}': stream 0 .* no usable block \(its shards hold no records\)")
    elif name.startswith("random-bytes-named-gz"):
        path.write_bytes(random.Random(0).randbytes(20_000))
        if name.endswith("read-as-jsonl"):
            source["format"] = "jsonl"
            expected = ("BadDataError", rf"no usable block \(\d+ bad records .*; worst file {where}: \['line ")
        else:
            expected = ("DataSpecError", rf"^data.sources\[0\].path: {where} ends in .gz; compressed files are not")
    elif name == "gzip-read-as-jsonl":
        path.write_bytes(gzip.compress(b'{"text": "compressed"}\n' * 100))
        source["format"] = "jsonl"
        expected = ("DataSpecError", rf"^data.sources\[0\].path: {where} is gzip-compressed; compressed files are not")
    else:
        raise ValueError(f"unknown case {name!r}")
    return {"sources": [source], "seq_len": SEQ_LEN, "streams_per_rank": 1, "min_shards": 4}, *expected


def undecodable_image_folder(root: Path) -> Path:
    """A class folder (two classes) whose every image file holds random bytes."""
    rng = random.Random(0)
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(3):
            (root / label / f"{i}.png").write_bytes(rng.randbytes(300))
    return root
