"""Request ids: the client's own X-Request-ID if it sent a sane one, else a new id.

New ids are UUID-shaped: a random prefix drawn once per process and a counter, unique across
processes and restarts without a call to os.urandom per request (uuid4 is a syscall, which
showed in the event loop's profile under load). The request middleware
(appliance.api.recorder) puts the id on every answer."""

from __future__ import annotations

import itertools
import re
import uuid

from litestar.types import Scope

from appliance.headers import request_header

_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_PREFIX = str(uuid.uuid4())[:24]  # 8-4-4-4- of a random UUID
_COUNTER = itertools.count(1)


def new_request_id() -> str:
    return f"{_PREFIX}{next(_COUNTER):012x}"


def ensure_request_id(scope: Scope) -> str:
    """The request's id, made once and kept in the scope state."""
    state = scope.setdefault("state", {})  # type: ignore[typeddict-item]
    request_id = state.get("request_id")
    if request_id is None:
        sent = request_header(scope, b"x-request-id")
        request_id = state["request_id"] = sent if _CLIENT_ID.match(sent) else new_request_id()
    return request_id
