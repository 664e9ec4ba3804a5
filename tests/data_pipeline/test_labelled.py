"""The built-in Rotten Tomatoes task: the real corpus, split by movie."""

from collections import Counter

import pytest

from data_pipeline.labelled import ROTTEN_TOMATOES_LABELS, SPLITS, movie_split, rotten_tomatoes


def test_rotten_tomatoes_has_every_review_once_and_no_plots():
    rows = {split: rotten_tomatoes(split) for split in SPLITS}
    labels = Counter(row["label"] for split_rows in rows.values() for row in split_rows)
    assert labels == {1: 7403, 0: 5405}  # fresh, rotten (the 1,097 plot summaries are left out)
    assert ROTTEN_TOMATOES_LABELS == ("rotten", "fresh")
    assert all(row["text"] and row["text"] == row["text"].strip() for split_rows in rows.values() for row in split_rows)


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


# ---------------------------------------------------------------------------------------------------- labelled files

import numpy as np  # noqa: E402

from data_pipeline.labelled import (  # noqa: E402
    pad_batch,  # noqa: E402
    parse_labelled_text,
    read_labelled,
)
from data_pipeline.spec import DataSpecError  # noqa: E402
from data_pipeline.stream import bad_record_summary  # noqa: E402
from launcher.config.run import parse_run_config  # noqa: E402
from launcher.errors import ConfigError  # noqa: E402
from launcher.metrics.classification import macro_f1  # noqa: E402
from launcher.train.tasks import ExampleLoader  # noqa: E402
from tests import elastic_data as elastic  # noqa: E402


def write(path, text):
    path.write_text(text)
    return str(path)


def test_csv_jsonl_and_json_sources_with_string_and_integer_labels(tmp_path):
    csv_file = write(tmp_path / "a.csv", 'review,stars\ngreat,pos\nawful,neg\n"long, quoted",pos\n')
    jsonl = write(tmp_path / "b.jsonl", '{"review": "meh", "stars": "neg"}\n\n{"review": "wow", "stars": "pos"}\n')
    spec = parse_labelled_text({"sources": [csv_file, jsonl], "text_field": "review", "label_field": "stars"})
    examples = read_labelled(spec)
    assert examples.label_names == ("neg", "pos")  # sorted names when none are given
    assert examples.texts == ["great", "awful", "long, quoted", "meh", "wow"]
    assert examples.labels == [1, 0, 1, 0, 1] and examples.bad == {}
    numbers = write(tmp_path / "c.json", '[{"text": "x", "label": 2}, {"text": "y", "label": "0"}]')
    examples = read_labelled(parse_labelled_text({"sources": [numbers], "max_bad_fraction": 0.0}))
    assert examples.label_names == ("0", "1", "2") and examples.labels == [2, 0]


def test_bad_records_are_skipped_counted_and_located(tmp_path):
    rows = "text,label\n" + "".join(f"fine {i},a\n" for i in range(20)) + ",a\nno label,\nunknown,zzz\n"
    path = write(tmp_path / "bad.csv", rows)
    spec = parse_labelled_text({"sources": [path], "labels": ["a", "b"], "max_bad_fraction": 0.2})
    examples = read_labelled(spec)
    assert len(examples.texts) == 20 and examples.bad == {"empty_text": 1, "bad_label": 2}
    assert examples.bad_locations[0] == f"{path}: line 22: empty_text"
    assert bad_record_summary(examples.bad_records) == {  # as a run reports them (stream statistics' form)
        "total": 3,
        "by_reason": {"empty_text": 1, "bad_label": 2},
        "by_source": {str(path): 3},
        "first": [f"{path}: line 22: empty_text", f"{path}: line 23: bad_label", f"{path}: line 24: bad_label"],
    }
    strict = parse_labelled_text({"sources": [path], "labels": ["a", "b"], "max_bad_fraction": 0.01})
    with pytest.raises(DataSpecError, match=r"3 of 23 records are bad .* first: .*bad.csv: line 22: empty_text"):
        read_labelled(strict)


def test_records_without_the_text_field_name_the_fields_read(tmp_path):
    path = write(tmp_path / "reviews.jsonl", '{"review": "great", "label": 1}\n' * 5 + "{not json\n")
    with pytest.raises(DataSpecError) as error:
        read_labelled(parse_labelled_text({"sources": [path]}))
    assert str(error.value) == (
        f"data: no usable examples in [{str(path)!r}] ({{'missing_text_field': 5, 'invalid_json': 1}}; text from "
        f"'text', labels from 'label'); first: {path}: line 1: missing_text_field"
    )


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"sources": ["x.txt"], "max_length": 8}, r"data.sources\[0\].path: 'x.txt' is not a csv, jsonl, json file"),
        ({"sources": ["rotten-tomatoes"], "max_length": 1}, "data.max_length: must be >= 2"),
        ({"sources": ["rotten-tomatoes"], "labels": ["one"]}, "data.labels: must be a list of at least 2 distinct"),
        ({"sources": [{"builtin": "imdb"}], "max_length": 8}, r"data.sources\[0\].builtin: unknown labelled built-in"),
        ({"sources": ["rotten-tomatoes"], "shuffle": True}, "data.shuffle: unknown key"),
    ],
)
def test_bad_labelled_specs_fail_in_one_line(raw, message):
    with pytest.raises(DataSpecError, match=message):
        parse_labelled_text(raw)


def test_a_labelled_run_config_is_a_sequence_classification_task(tmp_path):
    raw = {
        "output_dir": str(tmp_path),
        "model": {"init_from": "runs/x/hf"},
        "data": {"sources": ["rotten-tomatoes"]},
        "eval_data": {"sources": ["rotten-tomatoes"]},
        "train": {"max_steps": 5},
    }
    config = parse_run_config(raw)
    assert config.task == "sequence-classification"
    assert config.tokenizer == "runs/x/hf"  # fine-tuning defaults to the checkpoint's tokenizer
    assert config.eval_data.sources[0].split == "validation" and config.eval_data.max_length == 128
    assert parse_run_config(config.to_dict()) == config
    with pytest.raises(ConfigError, match="train.mixup_alpha: applies to image classification only"):
        parse_run_config({**raw, "train": {"max_steps": 5, "mixup_alpha": 0.2}})
    with pytest.raises(
        ConfigError,
        match="tokenizer: bpe:4096 would train a new vocabulary; a run from "
        "model.init_from uses the checkpoint's tokenizer",
    ):
        parse_run_config({**raw, "tokenizer": "bpe:4096"})


def test_example_loader_order_is_independent_of_the_world_size_and_resumes_across_it():
    encoded = [[i + 1] * (1 + i % 3) for i in range(11)]
    labels = [i % 2 for i in range(11)]

    def make(rank, world, state):
        return ExampleLoader(encoded, labels, rank, world, 2, 0, seed=7, state=state)

    reference, _ = elastic.global_batches(make, 1, 12)  # 5 micro-batches an epoch (one example left out of each)
    epoch = [int(i) for batch in reference[:5] for i in batch["input_ids"][:, 0]]
    assert len(set(epoch)) == 10  # an epoch sees distinct examples
    assert elastic.same_batches(elastic.global_batches(make, 2, 12)[0], reference, "input_ids")
    resumed = elastic.resumed_across(make, [(2, 4), (1, 3), (2, 2), (1, 3)])
    assert all(torch_equal(a, b) for a, b in zip(resumed, reference)) and len(resumed) == 12
    with pytest.raises(ConfigError, match="before the world-size-independent example order"):
        make(0, 1, {"epoch": 0, "position": 0})


def torch_equal(a: dict, b: dict) -> bool:
    return all(bool((a[key] == b[key]).all()) for key in ("input_ids", "attention_mask", "labels"))


def test_pad_batch_and_macro_f1():
    batch = pad_batch([[5, 6, 7], [8]], [1, 0], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    confusion = np.array([[3, 1], [2, 4]])  # rows: truth, columns: prediction
    f1_0, f1_1 = 2 * 3 / (6 + 2 + 1), 2 * 4 / (8 + 1 + 2)
    assert macro_f1(confusion) == pytest.approx((f1_0 + f1_1) / 2)
