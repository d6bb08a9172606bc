"""Several models (service.models): the `model` option, each model's preprocessing defaults, and routing."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from core.errors import BadOptions, Conflict, NotFound
from core.options import Options
from inference.repository import ModelSpec
from service.models import Models
from tests.unit.fakes import LABELS, FakeVersions

pytestmark = pytest.mark.unit

SMALL = Options(resize=160, crop=128, interpolation="bicubic", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


class Catalogue(FakeVersions):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec, self.name = spec, spec.name


def spec(name: str, defaults: Options | None = None, size: int | None = None) -> ModelSpec:
    return ModelSpec(name=name, format="onnx", architecture="", file=f"/{name}.onnx", labels=tuple(LABELS),
                     defaults=defaults or Options(), input_size=size)


def models(default: str = "big") -> Models:
    specs = [spec("big"), spec("small", SMALL), spec("fixed", Options(resize=256, crop=224), size=224)]
    return Models({s.name: Catalogue(s) for s in specs}, default)  # type: ignore[misc]


def test_choosing_a_model_starts_its_preprocessing_from_that_models_defaults() -> None:
    chosen = models().options_for(Options(top_k=3), {"model": "small"})
    assert chosen == dataclasses.replace(SMALL, top_k=3, model="small")  # top_k is the session's, not the model's


def test_options_given_with_the_choice_win_over_the_models_defaults() -> None:
    chosen = models().options_for(Options(), {"model": "small", "crop": 100})
    assert (chosen.model, chosen.resize, chosen.crop) == ("small", 160, 100)


def test_changing_other_options_keeps_the_sessions_own_preprocessing() -> None:
    current = models().options_for(Options(), {"model": "small", "crop": 100})
    assert models().options_for(current, {"top_k": 2}) == dataclasses.replace(current, top_k=2)


def test_naming_the_default_model_is_no_change_of_model() -> None:
    current = Options(crop=200)
    assert models().options_for(current, {"model": "big"}).crop == 200


def test_a_change_of_model_drops_a_pin_on_the_former_models_version() -> None:
    assert models().options_for(Options(model_version="v7"), {"model": "small"}).model_version is None
    assert models().options_for(Options(), {"model": "small", "model_version": "v2"}).model_version == "v2"


def test_a_new_session_starts_from_its_models_defaults() -> None:
    assert models().initial_options({"model": "small"}) == dataclasses.replace(SMALL, model="small")
    assert models(default="small").initial_options({}) == SMALL  # the default model's, when none is chosen


def test_an_unknown_model_is_a_422_naming_the_field_and_the_served_models() -> None:
    with pytest.raises(BadOptions) as caught:
        models().options_for(Options(), {"model": "nope"})
    assert caught.value.field == "model"
    assert "'big', 'fixed', 'small'" in caught.value.message


def test_a_fixed_size_model_takes_only_its_own_crop() -> None:
    assert models().options_for(Options(), {"model": "fixed"}).crop == 224
    with pytest.raises(BadOptions) as caught:
        models().options_for(Options(), {"model": "fixed", "crop": 200})
    assert caught.value.field == "crop" and "224x224" in caught.value.message


def test_a_query_override_of_the_model_applies_the_same_rules() -> None:
    chosen = models().query_options(Options(), {"model": "small", "top_k": "2"})
    assert (chosen.model, chosen.crop, chosen.top_k) == ("small", 128, 2)
    assert models().query_options(Options(top_k=4), {}) == Options(top_k=4)


def test_routing_takes_each_request_to_its_models_catalogue() -> None:
    served = models()
    small = asyncio.run(served.served_for(None, Options(model="small")))
    default = asyncio.run(served.served_for(None, Options()))
    assert small is served.catalogue("small").active and default is served.catalogue("big").active
    assert small is not default


def test_a_model_gone_from_the_repository_is_a_409_for_sessions_that_chose_it() -> None:
    with pytest.raises(Conflict) as caught:
        asyncio.run(models().served_for(None, Options(model="retired")))
    assert caught.value.code == "model_not_served"
    with pytest.raises(NotFound):
        models().catalogue("retired")


def test_the_default_model_is_listed_first() -> None:
    assert models(default="small").names() == ["small", "big", "fixed"]
