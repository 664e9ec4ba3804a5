"""The built-in Rotten Tomatoes task: the real corpus, split by movie."""

from collections import Counter

import pytest

from data_pipeline.labelled import ROTTEN_TOMATOES_LABELS, SPLITS, movie_split, rotten_tomatoes


def test_rotten_tomatoes_has_every_review_once_and_no_plots():
    rows = {split: rotten_tomatoes(split) for split in SPLITS}
    labels = Counter(row["label"] for split_rows in rows.values() for row in split_rows)
    assert labels == {1: 7403, 0: 5405}  # fresh, rotten (the 1,097 plot summaries are left out)
    assert ROTTEN_TOMATOES_LABELS == ("rotten", "fresh")
    assert all(row["text"] and row["text"] == row["text"].strip() for split_rows in rows.values()
               for row in split_rows)


def test_rotten_tomatoes_splits_by_movie_about_80_10_10():
    movies = {split: {row["movie"] for row in rotten_tomatoes(split)} for split in SPLITS}
    assert not movies["train"] & movies["validation"] and not movies["train"] & movies["test"]
    assert not movies["validation"] & movies["test"]
    sizes = {split: len(rotten_tomatoes(split)) for split in SPLITS}
    total = sum(sizes.values())
    assert 0.7 < sizes["train"] / total < 0.9 and 0.05 < sizes["test"] / total < 0.15
    assert all(movie_split(movie) == split for split in SPLITS for movie in movies[split])
    assert rotten_tomatoes("test") == rotten_tomatoes("test")  # stable order


def test_unknown_split_is_one_line():
    with pytest.raises(ValueError, match="rotten-tomatoes split 'dev' is not one of"):
        rotten_tomatoes("dev")
