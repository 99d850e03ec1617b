"""The endpoints a batch job may target: each path's body type and the same work function its
real-time handler runs, plus the name its per-endpoint model aliases are kept under."""

from __future__ import annotations

from typing import NamedTuple

from appliance.api import (
    classify,
    documents,
    generation,
    openai,
    rerank,
    summarise,
    tasks,
    tei,
    vision,
)
from appliance.api.tasks import Endpoint


class JobEndpoint(NamedTuple):
    path: str
    endpoint: Endpoint
    alias_scope: str
    """The endpoint name its model aliases are looked up under (config endpoint_aliases)."""

    @property
    def takes_classifier(self) -> bool:
        return "classifier" in getattr(self.endpoint.body, "__struct_fields__", ())


def _alias_scope(path: str) -> str:
    name = path.removeprefix("/v1/").strip("/").split("/")[0]
    return "classify" if name == "tag" else name  # the classify API shares one alias scope


_ALL: dict[str, Endpoint] = {
    **tasks.ENDPOINTS,
    **classify.ENDPOINTS,
    **openai.ENDPOINTS,
    **generation.ENDPOINTS,
    **vision.ENDPOINTS,
    **summarise.ENDPOINTS,
    **rerank.ENDPOINTS,
    **documents.ENDPOINTS,
    **tei.ENDPOINTS,
}

JOB_ENDPOINTS: dict[str, JobEndpoint] = {
    path: JobEndpoint(path, endpoint, _alias_scope(path)) for path, endpoint in _ALL.items()
}
"""Every endpoint path a job may name, to how its lines are run."""
