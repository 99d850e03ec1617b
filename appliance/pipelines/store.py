"""Where pipelines are kept: the PipelineStore interface and its local implementation."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import msgspec

from appliance.owned import OwnedStore, Owner
from appliance.pipelines.spec import Pipeline, PipelineLimit, validate


class _File(msgspec.Struct):
    pipelines: list[Pipeline] = msgspec.field(default_factory=list)


# runtime_checkable: litestar checks each dependency's value against its annotation.
@runtime_checkable
class PipelineStore(Protocol):
    """Where pipelines are kept. Owner rules as for saved classifiers: a pipeline belongs to
    the key that saved it (None: an admin's, shared); a key sees its own and the shared
    ones, another key's are 404; only the owner or an admin may replace or delete one.
    `who=None` is the server itself. Calls block (files, a database): run them in a thread
    from the event loop when they write."""

    def list(self, who: Owner | None = None) -> list[Pipeline]: ...

    def get(self, name: str, who: Owner | None = None) -> Pipeline: ...

    def create(
        self, pipeline: Pipeline, *, replace: bool = False, who: Owner | None = None
    ) -> Pipeline: ...

    def delete(self, name: str, who: Owner | None = None) -> None: ...


class LocalPipelineStore(OwnedStore[Pipeline]):
    """One JSON file in data_dir, with the owner rules of appliance.owned."""

    noun, field, file_type = "pipeline", "pipelines", _File
    limit_error, config_key = PipelineLimit, "pipelines.max_per_key"
    validate = staticmethod(validate)
