"""What the console changes: sign-in and out, keys, model uploads and deletions, jobs. Every
change goes through the JSON API's own handler function or the store it calls, so the rules
(validation, scopes, limits) are the API's."""

from __future__ import annotations

import asyncio
import hmac
import secrets
from typing import Any

import msgspec
from litestar import Request, Response, get, post
from litestar.response import Redirect, Stream

from appliance.api import account, models
from appliance.console.pages import ADMIN, jobs_context, keys_context
from appliance.console.session import (
    COOKIE,
    CSRF_FIELD,
    LOGIN_CSRF_COOKIE,
    cleared_cookie,
    login_csrf_cookie,
    session_cookie,
)
from appliance.console.web import Console
from appliance.errors import ApplianceError, NotFound, ValidationFailed
from appliance.gateway.auth import current_key
from appliance.gateway.keys import KeyStore, KeyStoreError
from appliance.gateway.usage import UsageLog
from appliance.jobs.manager import JobManager
from appliance.models.builds import Builds
from appliance.models.registry import Registry


# ---- sign-in --------------------------------------------------------------------------------
@get("/console/login")
async def login_page(request: Request[Any, Any, Any], console: Console) -> Response[Any]:
    if console.sessions.key_of(request.cookies.get(COOKIE)) is not None:
        return Redirect("/console", status_code=303)  # signed in already
    token = secrets.token_urlsafe(24)
    response = console.page(request, "login.html", login_csrf=token, failed=False)
    response.cookies.append(login_csrf_cookie(request, token))
    return response


@post("/console/login", status_code=303)
async def login(request: Request[Any, Any, Any], console: Console, keys: KeyStore) -> Response[Any]:
    form = await request.form()
    expected = request.cookies.get(LOGIN_CSRF_COOKIE, "")
    sent = str(form.get(CSRF_FIELD, ""))
    key = keys.authenticate(str(form.get("key", "")).strip())
    if not expected or not hmac.compare_digest(expected, sent) or key is None:
        token = secrets.token_urlsafe(24)
        response = console.page(request, "login.html", status=401, login_csrf=token, failed=True)
        response.cookies.append(login_csrf_cookie(request, token))
        return response
    value, max_age = console.sessions.issue(key)
    response: Response[Any] = Redirect("/console", status_code=303)
    response.cookies.extend(
        [session_cookie(request, value, max_age), cleared_cookie(request, LOGIN_CSRF_COOKIE)]
    )
    return response


@post("/console/logout", opt={"console": "any"}, status_code=303)
async def logout(request: Request[Any, Any, Any]) -> Redirect:
    response = Redirect("/console/login", status_code=303)
    response.cookies.append(cleared_cookie(request, COOKIE))
    return response


# ---- keys -----------------------------------------------------------------------------------
def _optional_int(form: Any, field: str) -> int | None:
    value = str(form.get(field, "")).strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValidationFailed(
            f"`{field}` must be a whole number.", details={"field": field}
        ) from None


@post("/console/keys", opt=ADMIN)
async def create_key(
    request: Request[Any, Any, Any], console: Console, keys: KeyStore, usage: UsageLog
) -> Response[str]:
    try:
        created = await _create_key(request, keys)
    except ApplianceError as exc:  # shown above the table, which stays
        return _keys_section(request, console, keys, usage, error=exc, status=exc.status_code)
    return _keys_section(request, console, keys, usage, created=created)


def _keys_section(
    request: Request[Any, Any, Any],
    console: Console,
    keys: KeyStore,
    usage: UsageLog,
    *,
    created: dict[str, Any] | None = None,
    error: ApplianceError | None = None,
    status: int = 200,
) -> Response[str]:
    return console.page(
        request,
        "keys_section.html",
        status=status,
        created=created,
        error=error,
        **keys_context(keys, usage),
    )


async def _create_key(request: Request[Any, Any, Any], keys: KeyStore) -> dict[str, Any]:
    form = await request.form()
    if not str(form.get("name", "")).strip():
        raise ValidationFailed("Give the key a name.", details={"field": "name"})
    fields: dict[str, Any] = {
        "name": str(form.get("name", "")),
        "scopes": form.getall("scopes") if "scopes" in form else ["predict"],
        **{f: _optional_int(form, f) for f in ("requests_per_minute", "tokens_per_minute")},
        "token_quota": _optional_int(form, "token_quota"),
    }
    if models_text := str(form.get("models", "")).strip():
        fields["models"] = [m.strip() for m in models_text.split(",") if m.strip()]
    if expires := str(form.get("expires_at", "")).strip():
        fields["expires_at"] = expires if "T" in expires else f"{expires}T00:00:00Z"
    try:
        body = msgspec.convert(fields, account.KeyCreate)
    except msgspec.ValidationError as exc:
        raise ValidationFailed(str(exc)) from None
    return await account.create_key.fn(data=body, keys=keys)  # type: ignore[no-any-return]


@post("/console/keys/{key_id:str}/revoke", opt=ADMIN)
async def revoke_key(
    request: Request[Any, Any, Any], key_id: str, console: Console, keys: KeyStore, usage: UsageLog
) -> Response[str]:
    await account.revoke_key.fn(key_id=key_id, keys=keys)
    return _keys_section(request, console, keys, usage)


@post("/console/keys/{key_id:str}/limits", opt=ADMIN)
async def key_limits(
    request: Request[Any, Any, Any], key_id: str, console: Console, keys: KeyStore, usage: UsageLog
) -> Response[str]:
    form = await request.form()
    try:
        limits = {
            f: _optional_int(form, f)
            for f in ("requests_per_minute", "tokens_per_minute", "token_quota")
        }
        for field, value in limits.items():
            if value is not None and value < (0 if field == "token_quota" else 1):
                raise ValidationFailed(f"`{field}` must be positive.", details={"field": field})
        try:
            await asyncio.to_thread(keys.update, key_id, **limits)
        except KeyStoreError:
            raise NotFound(f"No key with id '{key_id}'.", details={"id": key_id}) from None
    except ApplianceError as exc:
        return _keys_section(request, console, keys, usage, error=exc, status=exc.status_code)
    return _keys_section(request, console, keys, usage)


# ---- models ---------------------------------------------------------------------------------
@post("/console/models/upload", opt=ADMIN, request_max_body_size=None)
async def upload_model(
    request: Request[Any, Any, Any], builds: Builds, name: str, task: str | None = None
) -> Response[dict[str, Any]]:
    """console.js sends the zip as the raw body (its progress bar follows the upload), as
    POST /v1/models takes it; the build is then watched on the models table."""
    return await models.upload_model.fn(  # type: ignore[no-any-return]
        request=request, builds=builds, name=name, task=task or None
    )


@post("/console/models/{slug:str}/delete", opt=ADMIN)
async def delete_model(
    request: Request[Any, Any, Any], slug: str, console: Console, registry: Registry, builds: Builds
) -> Response[str]:
    await models.delete_model.fn(slug=slug, registry=registry, builds=builds)
    visible = [models.detail(e) for e in registry.entries()]
    return console.page(request, "models_table.html", models=visible)


# ---- jobs -----------------------------------------------------------------------------------
@post("/console/jobs/upload", opt={"console": "jobs"}, request_max_body_size=None)
async def upload_job(
    request: Request[Any, Any, Any],
    jobs: JobManager,
    endpoint: str,
    model: str | None = None,
    start: bool = True,
) -> dict[str, Any]:
    key = current_key(request)
    job = await jobs.create(
        key,
        endpoint,
        request.stream(),
        model=model or None,
        content_type=request.headers.get("content-type", ""),
        content_length=request.content_length,
    )
    if start:
        job = await jobs.start_job(job.state.id, key)
    return jobs.view(job)


@post("/console/jobs/{job_id:str}/start", opt={"console": "jobs"})
async def start_job(
    request: Request[Any, Any, Any], job_id: str, console: Console, jobs: JobManager
) -> Response[str]:
    await jobs.start_job(job_id, current_key(request))
    return console.page(request, "jobs_table.html", **jobs_context(request, jobs))


@post("/console/jobs/{job_id:str}/delete", opt={"console": "jobs"})
async def delete_job(
    request: Request[Any, Any, Any], job_id: str, console: Console, jobs: JobManager
) -> Response[str]:
    await jobs.delete(job_id, current_key(request))
    return console.page(request, "jobs_table.html", **jobs_context(request, jobs))


@get("/console/jobs/{job_id:str}/results", opt={"console": "jobs"})
async def job_results(request: Request[Any, Any, Any], job_id: str, jobs: JobManager) -> Stream:
    blocks = jobs.results(job_id, current_key(request))
    return Stream(
        blocks,
        media_type="application/x-ndjson",
        headers={"Content-Disposition": f'attachment; filename="{job_id}-results.ndjson"'},
    )


ROUTES = [
    login_page,
    login,
    logout,
    create_key,
    revoke_key,
    key_limits,
    upload_model,
    delete_model,
    upload_job,
    start_job,
    delete_job,
    job_results,
]
