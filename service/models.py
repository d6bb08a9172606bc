"""Every model this server serves, each with its own catalogue of versions (service.catalogue).

The models are the one `[model]` configures and one per folder of the model repository
(`models.repository_dir`, inference.repository). A session runs the model its `model` option names, or
the default model (`models.default`). Choosing a model starts the session's preprocessing options from
that model's own defaults (its manifest's `[preprocess]`), except the ones given in the same change:
preprocessing belongs to the model, and a crop chosen for one model rarely suits another.

A training job adds a model over HTTP (PUT /v1/models/<name>: its folder as a tar archive): the folder is
unpacked beside the repository, read and checked as a published version is, moved into the repository,
exported behind the accuracy guard and served at once; the other replicas read it from the shared
repository when the registry announces it (service.follower.ModelsFollower). Deleting takes it away the
same way.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import shutil
import tarfile
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar, TypeVarTuple

from core.clock import now_ms
from core.errors import BadOptions, BadRequest, Conflict, NotFound, ServiceError, quoted
from core.options import MODEL_NAME, PREPROCESSING, Options
from core.session import Session
from inference.model import ModelLoadError
from inference.repository import ModelSpec, RepositoryError, model_folders, read_model
from inference.runner import ServedModel
from service.catalogue import ModelCatalogue, on_executor
from service.follower import ModelsFollower
from sessions.model_registry import ModelRegistry

log = logging.getLogger("inference.weights")
T = TypeVar("T")
Args = TypeVarTuple("Args")


class InvalidModel(ServiceError):
    """A model's folder (or its archive) cannot be served as it is; the message says what is wrong."""

    status = 422
    code = "invalid_model"


@dataclass(frozen=True)
class Repository:
    """What adding, deleting and following models needs from the composition root."""

    folder: Path  # models.repository_dir resolved: one folder per model, shared by the replicas
    registry: ModelRegistry
    configured: str  # `[model]`'s name: served from the config, never deleted
    max_archive_members: int  # models.max_archive_members
    max_archive_bytes: int  # models.max_archive_bytes: the unpacked files' total
    # Export the model and choose its runtime behind the accuracy guard (blocking; ModelLoadError).
    prepare: Callable[[ModelSpec], None]
    # The model's own file on its runtime, in a new catalogue of versions (blocking; ModelLoadError).
    serve: Callable[[ModelSpec], ModelCatalogue]


class Models:
    """The served models by name, and the option rules that span them."""

    def __init__(self, catalogues: Mapping[str, ModelCatalogue], default: str, *,
                 repository: Repository | None = None):
        """`repository`: where models are added and deleted over HTTP (None: they cannot be)."""
        if default not in catalogues:
            raise ValueError(f"the default model {default!r} is not among the served models")
        self._catalogues = dict(catalogues)
        self.default = default
        self.repository = repository
        self._changing = asyncio.Lock()  # one addition, deletion or catch-up at a time in this process
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="models")  # unpacking, checks, exports
        self._follower = ModelsFollower(self, repository.registry) if repository is not None else None
        self._started = False

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
            raise BadOptions("model", f"model {quoted(name)} is not served here; choose one of {self._named()} "
                                      "(GET /v1/models), or null for the default.")
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
        """Serve each model's active version, then follow the other replicas until close(): their versions,
        and the models they add or delete."""
        self._started = True
        for catalogue in self.catalogues:
            await catalogue.start()
        if self._follower is not None:
            await self._follower.start()

    async def close(self) -> None:
        if self._follower is not None:
            await self._follower.close()
        for catalogue in self.catalogues:
            await catalogue.close()
        self._started = False
        self._worker.shutdown(wait=False, cancel_futures=True)

    # -- adding and deleting models -------------------------------------------------------------------
    def upload_path(self, name: str) -> Path:
        """A fresh temporary file for the archive of the new model `name` (a hidden name in the repository,
        which read_repository skips); 400 for a bad name, 409 `model_exists` for a name served."""
        repository = self._repository()
        self._check_new(name, repository)
        repository.folder.mkdir(parents=True, exist_ok=True)
        return repository.folder / f".upload-{uuid.uuid4().hex}.partial"

    async def add(self, name: str, archive: Path) -> dict[str, Any]:
        """Serve the model whose folder `archive` holds (a tar, gzip or not) as `name`, here at once and on
        every replica; its listing entry. 422 `invalid_archive`, `invalid_model` or `invalid_weights` saying
        what is wrong, 409 `model_exists`."""
        repository = self._repository()
        staging = repository.folder / f".adding-{uuid.uuid4().hex}"
        try:
            async with self._changing:
                self._check_new(name, repository)
                await self._off(_unpack_and_check, archive, staging / name, repository)
                final = repository.folder / name
                try:
                    os.rename(staging / name, final)  # refused when the folder exists: one replica adds a name
                except OSError:
                    raise _exists(name) from None
                try:
                    catalogue = await self._off(_serve_folder, final, repository)
                except BaseException:
                    shutil.rmtree(final, ignore_errors=True)
                    raise
                await self._serve(name, catalogue)
                try:
                    if not await repository.registry.add_model(name, now_ms()):
                        log.warning("model %s was marked added already; serving the folder just added", name)
                except ServiceError:  # the replicas cannot be told: not added anywhere
                    await self._drop(name)
                    shutil.rmtree(final, ignore_errors=True)
                    raise
        finally:
            archive.unlink(missing_ok=True)
            shutil.rmtree(staging, ignore_errors=True)
        log.info("added model %s (%s, %d classes)", name, catalogue.spec.format, len(catalogue.active.model.labels))
        return {"default": False, **await catalogue.listing()}

    async def delete(self, name: str) -> None:
        """Stop serving the added model `name` here and on every replica, and delete its folder and its
        versions' files; 404 for a model not served, 409 `model_not_deletable` for `[model]`'s or the default."""
        repository = self._repository()
        async with self._changing:
            catalogue = self.catalogue(name)
            if name == repository.configured:
                raise Conflict(f"The model {name!r} is the one [model] configures; it is served from the config, "
                               "not the repository, and cannot be deleted.", code="model_not_deletable")
            if name == self.default:
                raise Conflict(f"The model {name!r} is the default model (models.default); make another model the "
                               "default first.", code="model_not_deletable")
            await repository.registry.delete_model(name)
            await self._drop(name)
            await self._off(_remove_folders, repository.folder / name, catalogue.model_dir)
        log.info("deleted model %s", name)

    # -- following the other replicas' additions and deletions (service.follower.ModelsFollower) ------
    async def follow_added(self, name: str) -> None:
        """Another replica added `name`: serve it from the shared repository."""
        async with self._changing:
            await self._serve_from_repository(name)

    async def follow_deleted(self, name: str) -> None:
        """Another replica deleted `name`: stop serving it (its files are that replica's to delete)."""
        async with self._changing:
            if self._deletable(name):
                await self._drop(name)

    async def catch_up(self) -> None:
        """Serve what the shared repository holds now, no more and no less (the events missed while not
        listening): a folder not served is read and served, a model whose folder is gone is dropped."""
        repository = self._repository()
        async with self._changing:
            present = set(model_folders(repository.folder))
            for name in [name for name in self._catalogues if name not in present and self._deletable(name)]:
                log.info("model %s left the repository; no longer serving it", name)
                await self._drop(name)
            for name in sorted(present - set(self._catalogues)):
                await self._serve_from_repository(name)

    # -- helpers ----------------------------------------------------------------------------------------
    def _repository(self) -> Repository:
        if self.repository is None:
            raise Conflict("This server adds no models over HTTP.", code="no_repository")
        return self.repository

    def _check_new(self, name: str, repository: Repository) -> None:
        if not MODEL_NAME.match(name):
            raise BadRequest("A model name is 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or "
                             "digit.", code="invalid_model_name")
        if name in self._catalogues or (repository.folder / name).exists():
            raise _exists(name)

    def _deletable(self, name: str) -> bool:
        return name in self._catalogues and name != self.default and name != self._repository().configured

    async def _serve_from_repository(self, name: str) -> None:
        if name in self._catalogues:
            return
        try:
            catalogue = await self._off(_serve_folder, self._repository().folder / name, self._repository())
        except ServiceError as exc:
            log.error("cannot serve the model %s from the repository (%s)", name, exc.message)
            return
        await self._serve(name, catalogue)
        log.info("following the repository: now serving model %s", name)

    async def _serve(self, name: str, catalogue: ModelCatalogue) -> None:
        self._catalogues[name] = catalogue
        if self._started:  # follow its versions as the others' are followed
            await catalogue.start()

    async def _drop(self, name: str) -> None:
        """Stop serving `name` here: sessions that chose it get 409 `model_not_served` from now on."""
        catalogue = self._catalogues.pop(name, None)
        if catalogue is None:
            return
        if self._started:
            await catalogue.close()
        # Its runtimes (the active version, those held for pins and canaries, its own file's) no longer count
        # in models.max_loaded.
        for served in {id(served): served for served in (*catalogue.loaded.served(), catalogue.base)}.values():
            release = getattr(served.backend, "release", None)
            if release is not None:
                release()

    async def _off(self, fn: Callable[[*Args], T], *args: *Args) -> T:
        return await on_executor(self._worker, fn, *args)


def _exists(name: str) -> Conflict:
    return Conflict(f"A model named {name!r} is served already (or its folder is in the repository); delete it "
                    "first, or choose another name.", code="model_exists")


def _unpack_and_check(archive: Path, folder: Path, repository: Repository) -> None:
    """Unpack `archive` into `folder` and check it as a served model: its manifest (422 `invalid_model`), and
    its file as a published version is checked (422 `invalid_weights` saying what differs)."""
    _unpack(archive, folder, repository.max_archive_members, repository.max_archive_bytes)
    try:
        spec = read_model(folder)
    except RepositoryError as exc:
        raise InvalidModel(str(exc)) from None
    path = Path(spec.file)
    if path.is_file():  # not torchvision's packaged weights, which need no check
        # Imported here: a process that never adds a model stays torch-free on an exported runtime.
        from inference.torch_model import load_checked

        load_checked(spec, path, spec.version or "added")


def _unpack(archive: Path, folder: Path, max_members: int, max_bytes: int) -> None:
    """The archive's regular files and folders under `folder`, within the limits; 422 `invalid_archive`."""
    folder.mkdir(parents=True)
    members: list[tarfile.TarInfo] = []
    total = 0
    try:
        with tarfile.open(archive, mode="r:*") as tar:
            while (member := tar.next()) is not None:
                members.append(member)
                total += member.size
                if len(members) > max_members:
                    raise _bad_archive(f"The archive holds more than models.max_archive_members ({max_members}) "
                                       "files and folders.")
                if total > max_bytes:
                    raise _bad_archive(f"The archive's files add up to more than models.max_archive_bytes "
                                       f"({max_bytes} bytes).")
                if not (member.isfile() or member.isdir()):
                    raise _bad_archive(f"The archive's member {quoted(member.name)} is not a regular file or a "
                                       "folder; send the model's folder with its files only.")
                parts = PurePosixPath(member.name).parts
                if member.name.startswith("/") or ".." in parts:
                    raise _bad_archive(f"The archive's member {quoted(member.name)} points outside the model's "
                                       "folder; archive the folder's contents (tar -C folder -czf - .).")
            tar.extractall(folder, members=members, filter="data")  # the data filter: a second line of defence
    except (tarfile.TarError, EOFError, OSError) as exc:
        if isinstance(exc, tarfile.FilterError):
            raise _bad_archive(f"The archive's member {quoted(exc.tarinfo.name)} cannot be unpacked safely "
                               f"({type(exc).__name__}).") from None
        raise _bad_archive(f"The body is not a tar archive (optionally gzip-compressed): {type(exc).__name__}; "
                           "send the model's folder as `tar -C folder -czf - .` makes it.") from None


def _bad_archive(message: str) -> InvalidModel:
    return InvalidModel(message, code="invalid_archive")


def _serve_folder(folder: Path, repository: Repository) -> ModelCatalogue:
    """The model in a repository `folder`, exported, its runtime chosen behind the guard, served."""
    try:
        spec = read_model(folder)
    except RepositoryError as exc:
        raise InvalidModel(str(exc)) from None
    try:
        repository.prepare(spec)
        return repository.serve(spec)
    except ModelLoadError as exc:
        message = str(exc) if repr(spec.name) in str(exc) else f"Model {spec.name!r}: {exc}"
        raise InvalidModel(message) from None


def _remove_folders(*folders: Path) -> None:
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
