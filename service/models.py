"""Every model this server serves, each with its own catalogue of versions (service.catalogue).

The models are the one `[model]` configures and one per folder of the model repository
(`models.repository_dir`, inference.repository). A session runs the model its `model` option names, or
the default model (`models.default`). Choosing a model starts the session's preprocessing options from
that model's own defaults (its manifest's `[preprocess]`), except the ones given in the same change:
preprocessing belongs to the model, and a crop chosen for one model rarely suits another.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

from core.errors import BadOptions, Conflict, NotFound, quoted
from core.options import PREPROCESSING, Options
from core.session import Session
from inference.repository import ModelSpec
from inference.runner import ServedModel
from service.catalogue import ModelCatalogue


class Models:
    """The served models by name, and the option rules that span them."""

    def __init__(self, catalogues: Mapping[str, ModelCatalogue], default: str):
        if default not in catalogues:
            raise ValueError(f"the default model {default!r} is not among the served models")
        self._catalogues = dict(catalogues)
        self.default = default

    def names(self) -> list[str]:
        """The served models, the default first."""
        return [self.default, *sorted(name for name in self._catalogues if name != self.default)]

    def catalogue(self, name: str | None) -> ModelCatalogue:
        """The catalogue of the model `name` (None: the default model); 404 `model_not_found` for another name."""
        found = self._catalogues.get(self.default if name is None else name)
        if found is None:
            raise NotFound(f"Unknown model {quoted(name)}; this server serves {self._named()} (GET /v1/models).",
                           code="model_not_found")
        return found

    def spec(self, name: str | None) -> ModelSpec:
        return self.catalogue(name).spec

    @property
    def catalogues(self) -> list[ModelCatalogue]:
        return [self._catalogues[name] for name in self.names()]

    # -- options -------------------------------------------------------------------------------------
    def initial_options(self, changes: Any) -> Options:
        """A new session's options: the chosen model's (or the default model's) defaults, then `changes`."""
        return self.options_for(self.spec(None).defaults, changes, reset=True)

    def options_for(self, current: Options, changes: Any, *, reset: bool = False) -> Options:
        """`current` with `changes` applied (Options.merged, 422 for a bad value), where a change of model
        (or `reset`) starts the preprocessing options from the chosen model's defaults; 422 `invalid_options`
        naming the field for a model not served, or a crop a fixed-size model cannot take."""
        merged = current.merged(changes)  # every value's own check first, and the model name's form
        if reset or (merged.model or self.default) != (current.model or self.default):
            spec = self._spec_for_option(merged.model)
            given = set(changes) if isinstance(changes, Mapping) else set()
            defaults: dict[str, Any] = {name: getattr(spec.defaults, name) for name in PREPROCESSING
                                        if name not in given}
            if "model_version" not in given:  # a pin names a version of the model chosen before
                defaults["model_version"] = None
            merged = dataclasses.replace(merged, **defaults).merged({})  # crop <= resize, checked again
        self.check(merged)
        return merged

    @functools.lru_cache(maxsize=32)  # noqa: B019 (one Models per process, for its life)
    def anonymous_options(self, top_k: int) -> Options:
        """The options of a request without a session: the default model's defaults, with `top_k`."""
        return self.initial_options({"top_k": top_k})

    def query_options(self, current: Options, query: Mapping[str, str]) -> Options:
        """A request's options: the session's, with the query's text overrides applied as options_for does."""
        return self.options_for(current, Options.parse_query(query)) if query else current

    def check(self, options: Options) -> None:
        """422 `invalid_options` unless the options' model is served and takes their crop."""
        spec = self._spec_for_option(options.model)
        if spec.input_size is not None and options.crop != spec.input_size:
            raise BadOptions("crop", f"The model {spec.name!r} takes {spec.input_size}x{spec.input_size} images; "
                                     f"crop must be {spec.input_size}.")

    def _spec_for_option(self, name: str | None) -> ModelSpec:
        if name is not None and name not in self._catalogues:
            raise BadOptions("model", f"Unknown model {quoted(name)}; choose one of {self._named()} (GET /v1/models), "
                                      "or null for the default.")
        return self.spec(name)

    def _named(self) -> str:
        return ", ".join(repr(name) for name in self.names())

    # -- serving --------------------------------------------------------------------------------------
    def catalogue_for(self, options: Options) -> ModelCatalogue:
        """The catalogue a request under `options` runs on; 409 `model_not_served` for a model chosen while it
        was served and gone since (the repository changed), so that the session knows to choose again."""
        found = self._catalogues.get(self.default if options.model is None else options.model)
        if found is None:
            raise Conflict(f"The model {quoted(options.model)} is no longer served; choose one of {self._named()} "
                           "(GET /v1/models), or null for the default.", code="model_not_served")
        return found

    async def served_for(self, session: Session | None, options: Options) -> ServedModel:
        """The model version a request runs (service.catalogue's served_for, on the options' model)."""
        return await self.catalogue_for(options).served_for(session, options)

    def held(self, options: Options) -> ServedModel:
        """The version an anonymous request runs: the model's active one, or a version already loaded here."""
        return self.catalogue_for(options).loaded.get(options.model_version)

    def labels(self, name: str) -> list[str]:
        """The class labels of the model `name` (index i names class i), what its feedback names."""
        return self.catalogue_for(Options(model=name)).active.model.labels

    async def listing(self) -> dict[str, Any]:
        """GET /v1/models: every model, the default first, with its manifest's facts and its versions."""
        models = []
        for catalogue in self.catalogues:
            models.append({"default": catalogue.name == self.default, **await catalogue.listing()})
        return {"default": self.default, "models": models}

    async def start(self) -> None:
        """Serve each model's active version, then follow the other replicas until close()."""
        for catalogue in self.catalogues:
            await catalogue.start()

    async def close(self) -> None:
        for catalogue in self.catalogues:
            await catalogue.close()
