"""The data section's kinds: explicit or inferred (old configs), dumped with ``kind``, round-tripping."""

import pytest

from data_pipeline.data_spec import infer_kind, parse_data
from data_pipeline.errors import DataSpecError


@pytest.mark.parametrize(
    "raw, kind",
    [
        ({"sources": ["shakespeare"], "seq_len": 64}, "text"),
        ({"sources": [{"path": "corpus"}]}, "text"),
        ({"sources": ["fashion-mnist"]}, "image"),
        ({"sources": [{"folder": "x"}]}, "image"),
        ({"sources": [{"hf": "beans"}], "image_size": 28, "num_classes": 3}, "image"),
        ({"sources": ["rotten-tomatoes"]}, "labelled"),
        ({"sources": [{"path": "x.csv"}], "max_length": 8}, "labelled"),
        ({"kind": "labelled", "sources": [{"path": "x.csv"}]}, "labelled"),
    ],
)
def test_the_kind_is_given_or_inferred_by_the_old_rule(raw, kind):
    assert infer_kind(raw) == kind
    spec = parse_data(raw)
    assert spec.kind == kind
    dumped = spec.model_dump(mode="json")
    assert dumped["kind"] == kind and parse_data(dumped) == spec


def test_a_wrong_kind_is_one_line():
    with pytest.raises(DataSpecError, match=r"^data.kind: 'audio' is not one of \['text', 'image', 'labelled'\]$"):
        parse_data({"kind": "audio", "sources": ["x"]})
    with pytest.raises(DataSpecError, match=r"^data.image_size: unknown key"):
        parse_data({"kind": "text", "sources": ["x"], "image_size": 28})
