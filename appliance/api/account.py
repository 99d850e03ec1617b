"""Keys, balance, usage and logs (seeds/classify-api.txt management endpoints)."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
from litestar import Request, delete, get, post
from litestar.params import Parameter

from appliance.errors import Forbidden, NotFound, ValidationFailed
from appliance.gateway.auth import current_key
from appliance.gateway.keys import KeyStore, KeyStoreError
from appliance.gateway.usage import UsageLog


class KeyCreate(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(pattern=r"\S", max_length=200)]
    """Something to recognise the key by (not only spaces; every listing shows it)."""
    scopes: list[Literal["predict", "jobs", "admin"]] = msgspec.field(
        default_factory=lambda: ["predict"]
    )
    models: Annotated[list[str], msgspec.Meta(min_length=1)] | None = None
    """Model slugs this key may use, or ["*"]; absent/null: all. An empty list is a 422."""
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    token_quota: int | None = None
    expires_at: datetime | None = None


def _seconds(value: datetime | None, default: float) -> float:
    return value.timestamp() if value is not None else default


@get("/v1/keys", opt={"scope": "admin"}, tags=["account"])
async def list_keys(keys: KeyStore) -> dict[str, Any]:
    """Every key's fields (never secrets or hashes)."""
    return {"data": [k.public() for k in keys.list()]}


@post("/v1/keys", opt={"scope": "admin"}, tags=["account"], status_code=201)
async def create_key(data: KeyCreate, keys: KeyStore) -> dict[str, Any]:
    """Create a key. The secret `key` is in this response only; it is stored hashed."""
    if not data.name.strip():
        raise ValidationFailed("`name` must not be empty.", details={"field": "name"})
    for field in ("requests_per_minute", "tokens_per_minute", "token_quota"):
        value = getattr(data, field)
        if value is not None and value < (0 if field == "token_quota" else 1):
            raise ValidationFailed(f"`{field}` must be positive.", details={"field": field})
    try:
        key, secret = await asyncio.to_thread(
            keys.create,
            data.name,
            data.scopes,
            models=data.models,
            requests_per_minute=data.requests_per_minute,
            tokens_per_minute=data.tokens_per_minute,
            token_quota=data.token_quota,
            expires_at=data.expires_at.isoformat() if data.expires_at else None,
        )
    except KeyStoreError as exc:
        field = "models" if str(exc).startswith("models") else "scopes"
        raise ValidationFailed(str(exc), details={"field": field}) from None
    return {**key.public(), "key": secret}


@delete("/v1/keys/{key_id:str}", opt={"scope": "admin"}, tags=["account"], status_code=200)
async def revoke_key(key_id: str, keys: KeyStore) -> dict[str, Any]:
    """Revoke a key: it gets 401 from the next request on."""
    try:
        key = await asyncio.to_thread(keys.revoke, key_id)
    except KeyStoreError:
        raise NotFound(f"No key with id '{key_id}'.", details={"id": key_id}) from None
    return {"id": key.id, "revoked": True}


@get("/v1/balance", opt={"scope": "any"}, tags=["account"])
async def balance(request: Request[Any, Any, Any], usage: UsageLog) -> dict[str, Any]:
    """The calling key's token quota, what it has spent and what remains (null: no quota)."""
    key = current_key(request)
    spent = usage.spent(key.id)
    quota = key.token_quota
    return {
        "key_id": key.id,
        "token_quota": quota,
        "spent": spent,
        "remaining": None if quota is None else max(0, quota - spent),
    }


def _scope_key(request: Request[Any, Any, Any], key_id: str | None) -> str | None:
    """Admins see every key (or the one they name); other keys see only themselves."""
    key = current_key(request)
    if key.allows_scope("admin"):
        return key_id
    if key_id is not None and key_id != key.id:
        raise Forbidden("Only an admin key may read another key's usage.")
    return key.id


@get("/v1/usage", opt={"scope": "any"}, tags=["account"])
async def usage_summary(
    request: Request[Any, Any, Any],
    usage: UsageLog,
    since: datetime | None = None,
    until: datetime | None = None,
    key_id: str | None = None,
) -> dict[str, Any]:
    """Requests and tokens per day and model (UTC days; default: the last 30 days)."""
    who = _scope_key(request, key_id)
    now = time.time()
    rows = await asyncio.to_thread(
        usage.usage, who, _seconds(since, now - 30 * 86400), _seconds(until, now + 1)
    )
    return {
        "data": rows,
        "total_requests": sum(r["requests"] for r in rows),
        "total_tokens": sum(r["tokens"] for r in rows),
    }


@get("/v1/logs", opt={"scope": "any"}, tags=["account"])
async def request_logs(
    request: Request[Any, Any, Any],
    usage: UsageLog,
    limit: int = Parameter(default=50, ge=1, le=1000),
    # A larger offset was a 500 (SQLite integers are 64-bit); 10**15 is exact as a JSON double.
    offset: int = Parameter(default=0, ge=0, le=10**15),
    # HTTP statuses only: a larger number was a 500 (past SQLite's 64-bit integers).
    status: int | None = Parameter(default=None, ge=100, le=599),
    model: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    key_id: str | None = None,
) -> dict[str, Any]:
    """Recent requests, newest first: time, key id, endpoint, model, status, latency, tokens,
    cached, request id. Paginate with `offset` (the response gives `next_offset`)."""
    who = _scope_key(request, key_id)
    rows = await asyncio.to_thread(
        usage.logs,
        key_id=who,
        status=status,
        model=model,
        since=since.timestamp() if since else None,
        until=until.timestamp() if until else None,
        limit=limit + 1,
        offset=offset,
    )
    more = len(rows) > limit
    return {"data": rows[:limit], "has_more": more, "next_offset": offset + limit if more else None}
