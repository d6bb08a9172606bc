"""Options: validation, merging and query overrides (pure unit tests)."""

from __future__ import annotations

import dataclasses

import pytest

from core.errors import BadOptions
from core.options import Options

pytestmark = pytest.mark.unit


def test_defaults_and_round_trip_through_redis_fields() -> None:
    options = Options().merged({"top_k": 3, "mean": [0.5, 0.5, 0.5]})
    assert options.top_k == 3 and options.mean == (0.5, 0.5, 0.5)
    stored = tuple(options.to_redis().items())
    assert Options.from_redis(stored) == options
    assert hash(options) == hash(Options.from_redis(stored))


def test_to_dict_names_every_field_as_json_values() -> None:
    pinned = Options(model="products", model_version="v2", top_k=3)
    assert pinned.to_dict() == {**dataclasses.asdict(pinned), "mean": list(pinned.mean), "std": list(pinned.std)}
    assert "model_version" not in Options().to_dict()  # unpinned sessions read as before versions existed
    assert "model" not in Options().to_dict()  # sessions on the default model read as before models existed


@pytest.mark.parametrize("changes, field", [
    ({"resize": 31}, "resize"), ({"resize": 1025}, "resize"), ({"resize": 256.0}, "resize"),
    ({"resize": True}, "resize"), ({"crop": 257}, "crop"), ({"top_k": 21}, "top_k"),
    ({"interpolation": "area"}, "interpolation"), ({"color": "bgr"}, "color"),
    ({"mean": [0.1, 0.2]}, "mean"), ({"mean": "0.5"}, "mean"), ({"std": [1, 1, -1]}, "std"),
    ({"mean": [float("nan"), 0, 0]}, "mean"), ({"nope": 1}, "nope"), ({"model": "../x"}, "model"),
    ({"model": 3}, "model"),
])
def test_bad_values_name_their_field(changes: dict, field: str) -> None:
    with pytest.raises(BadOptions) as caught:
        Options().merged(changes)
    assert caught.value.field == field and caught.value.status == 422


def test_crop_is_checked_against_the_merged_resize() -> None:
    assert Options().merged({"resize": 128, "crop": 128}).crop == 128
    with pytest.raises(BadOptions):
        Options(resize=128, crop=128).merged({"crop": 129})


def test_query_text_is_parsed_per_type() -> None:
    options = Options().with_query({"top_k": "2", "mean": "0.1,0.2,0.3", "color": "grayscale"})
    assert options.top_k == 2 and options.mean == (0.1, 0.2, 0.3) and options.color == "grayscale"
    for bad in [{"top_k": "two"}, {"std": "1,x,1"}, {"crop": ""}]:
        with pytest.raises(BadOptions):
            Options().with_query(bad)
