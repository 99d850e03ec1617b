"""Saved pipelines (issue #18): validation at creation, runs over the tiny models (tokens and
cache per step, a failing step's error), owners, the GET form, and pipelines as batch jobs."""

from __future__ import annotations

import copy
import json
import os
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient

from appliance.classifiers import Owner
from appliance.errors import Conflict, Forbidden, NotFound, ValidationFailed
from appliance.pipelines import (
    LocalPipelineStore,
    Pipeline,
    PipelineLimit,
    PipelineStore,
    Step,
    waves,
)
from tests.documents import b64, make_docx, make_pdf

LABELS = ["ham", "spam"]  # tiny-cls's own labels
CHAIN = {
    "name": "emotion-then-classify",
    "description": "the emotions of a text, then whether they read as spam",
    "steps": [
        {
            "name": "emo",
            "endpoint": "/v1/emotion",
            "input": {"text": "$.input.text", "model": "tiny-embed"},
        },
        {
            "name": "cls",
            "endpoint": "/v1/classify",
            "input": {"text": "$.steps.emo.output", "labels": LABELS, "model": "tiny-cls"},
        },
    ],
}
TEXT = "click here to win free money"


def auth(key: str) -> dict[str, str]:
    return {"x-api-key": key}


def new_key(client: TestClient, scopes: list[str] | None = None, **limits: Any) -> str:
    return client.keys.create("app", scopes or ["predict"], **limits)[1]  # type: ignore[attr-defined]


def save(client: TestClient, key: str, body: dict[str, Any] = CHAIN) -> dict[str, Any]:
    r = client.post("/v1/pipelines", json=body, headers=auth(key))
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def with_step(index: int, **changes: Any) -> dict[str, Any]:
    body = copy.deepcopy(CHAIN)
    body["steps"][index].update(changes)
    return body


def with_input(index: int, **fields: Any) -> dict[str, Any]:
    body = copy.deepcopy(CHAIN)
    body["steps"][index]["input"].update(fields)
    return body


# ---- creation ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({**CHAIN, "name": "Bad Name"}, "name", "regex"),
        ({**CHAIN, "steps": []}, "steps", "length >= 1"),
        (with_step(1, name="emo"), "steps[1].name", "unique"),
        (with_step(0, name="-x"), "steps[0].name", "regex"),
        (with_step(0, endpoint="/v1/keys"), "steps[0].endpoint", "cannot call '/v1/keys'"),
        (with_step(0, endpoint="/pipelines/other"), "steps[0].endpoint", "cannot call"),
        (with_input(0, colour="red"), "steps[0].input.colour", "no field 'colour'"),
        (with_step(1, input={"labels": LABELS}), None, None),  # /v1/classify: text or file
        (with_step(0, input={"model": "tiny-embed"}), "steps[0].input.text", "needs the field"),
        (with_input(1, text="$.steps.summary.output"), "steps[1].input.text", "unknown step"),
        (with_input(1, text="$.steps.emo.label"), "steps[1].input.text", "no field 'label'"),
        (with_input(0, text="$.steps.emo.output"), "steps[0].input.text", "refers to itself"),
        (with_input(0, text="$.steps.cls.label"), "steps[0].input.text", "later step 'cls'"),
        (with_input(1, text="$.step.emo.output"), "steps[1].input.text", "not a reference"),
        (with_input(1, text="$.steps"), "steps[1].input.text", "names no step"),
        (with_input(1, labels=["$.steps.nope"]), "steps[1].input.labels[0]", "unknown step"),
    ],
)
def test_creation_refuses_what_would_fail_every_run(
    client: TestClient, predict_key: str, body: dict[str, Any], field: str | None, words: str | None
) -> None:
    r = client.post("/v1/pipelines", json=body, headers=auth(predict_key))
    if field is None:
        # Which of text/file /v1/classify needs is only known at run time (a body rule).
        assert r.status_code == 201, r.text
        return
    assert r.status_code == 422, r.text
    error = r.json()
    assert error["code"] == "VALIDATION_ERROR"
    assert error["details"]["field"] == field
    assert words in error["message"], error["message"]
    assert client.get("/v1/pipelines", headers=auth(predict_key)).json()["data"] == []


def test_a_reference_to_a_later_step_is_marked_as_a_cycle(
    client: TestClient, predict_key: str
) -> None:
    r = client.post(
        "/v1/pipelines",
        json=with_input(0, text="$.steps.cls.label"),
        headers=auth(predict_key),
    )
    assert r.status_code == 422
    assert r.json()["details"] == {
        "field": "steps[0].input.text",
        "step": "emo",
        "reference": "$.steps.cls.label",
        "cycle": True,
    }


def test_crud(client: TestClient, predict_key: str) -> None:
    saved = save(client, predict_key)
    assert saved["name"] == CHAIN["name"] and saved["steps"] == CHAIN["steps"]
    assert saved["owner"] is not None and saved["created_at"]
    assert client.get("/v1/pipelines", headers=auth(predict_key)).json()["data"] == [saved]
    assert client.get(f"/v1/pipelines/{CHAIN['name']}", headers=auth(predict_key)).json() == saved
    again = client.post("/v1/pipelines", json=CHAIN, headers=auth(predict_key))
    assert again.status_code == 409
    replaced = client.post(
        "/v1/pipelines", json={**CHAIN, "description": "new", "replace": True},
        headers=auth(predict_key),
    )  # fmt: skip
    assert replaced.status_code == 201 and replaced.json()["description"] == "new"
    gone = client.delete(f"/v1/pipelines/{CHAIN['name']}", headers=auth(predict_key))
    assert gone.status_code == 200 and gone.json() == {"name": CHAIN["name"], "deleted": True}
    assert (
        client.get(f"/v1/pipelines/{CHAIN['name']}", headers=auth(predict_key)).status_code == 404
    )
    assert (
        client.delete(f"/v1/pipelines/{CHAIN['name']}", headers=auth(predict_key)).status_code
        == 404
    )


def test_scopes(client: TestClient) -> None:
    key = new_key(client, ["jobs"])
    assert client.post("/v1/pipelines", json=CHAIN, headers=auth(key)).status_code == 403
    assert client.get("/v1/pipelines", headers=auth(key)).status_code == 403
    assert client.post("/pipelines/x", json={}, headers=auth(key)).status_code == 403
    assert client.post("/v1/pipelines", json=CHAIN).status_code == 401


# ---- running -----------------------------------------------------------------------------------
def direct(client: TestClient, key: str, path: str, body: dict[str, Any]) -> tuple[Any, int]:
    """The endpoint's own answer and the tokens it charged."""
    r = client.post(path, json=body, headers=auth(key))
    assert r.status_code == 200, r.text
    return r.json(), int(r.headers["X-Tokens-Used"])


def without_timings(answer: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in answer.items() if k not in ("latency_ms", "cached", "tokens")}


def test_a_chain_answers_as_its_endpoints_and_charges_each_step(client: TestClient) -> None:
    owner = new_key(client, token_quota=100_000)
    save(client, owner)
    r = client.post(f"/pipelines/{CHAIN['name']}", json={"text": TEXT}, headers=auth(owner))
    assert r.status_code == 200, r.text
    run = r.json()
    assert set(run) == {"output", "steps", "tokens", "latency_ms"}
    assert list(run["steps"]) == ["emo", "cls"]
    assert run["output"] == run["steps"]["cls"]

    # The same bodies sent to the endpoints themselves, by another key (its own cache).
    other = new_key(client)
    emo, emo_tokens = direct(client, other, "/v1/emotion", {"text": TEXT, "model": "tiny-embed"})
    cls, cls_tokens = direct(
        client, other, "/v1/classify",
        {"text": emo["output"], "labels": LABELS, "model": "tiny-cls"},
    )  # fmt: skip
    assert run["steps"]["emo"] == emo
    assert without_timings(run["output"]) == without_timings(cls)
    assert emo_tokens > 0 and cls_tokens > 0
    assert run["tokens"] == emo_tokens + cls_tokens
    assert r.headers["X-Tokens-Used"] == str(emo_tokens + cls_tokens)
    assert r.headers["X-Cache"] == "MISS"
    assert r.headers["X-Model"] == "tiny-cls"
    assert "X-RateLimit-Remaining-Tokens" in r.headers
    balance = client.get("/v1/balance", headers=auth(owner)).json()
    assert balance["spent"] == emo_tokens + cls_tokens

    # /v1/pipelines/{name}/run is the same operation.
    r = client.post(f"/v1/pipelines/{CHAIN['name']}/run", json={"text": TEXT}, headers=auth(owner))
    assert r.status_code == 200 and r.json()["steps"]["emo"] == emo


def test_each_step_is_cached(client: TestClient) -> None:
    key = new_key(client)
    save(client, key)
    url = f"/pipelines/{CHAIN['name']}"
    first = client.post(url, json={"text": TEXT}, headers=auth(key))
    second = client.post(url, json={"text": TEXT}, headers=auth(key))
    assert first.headers["X-Cache"] == "MISS" and int(first.headers["X-Tokens-Used"]) > 0
    assert second.headers["X-Cache"] == "HIT"
    assert second.headers["X-Tokens-Used"] == "0" and second.json()["tokens"] == 0
    assert second.json()["steps"]["emo"] == first.json()["steps"]["emo"]
    assert second.json()["output"]["cached"] is True
    # A new text is a miss for the first step; the second step misses only if its text is new.
    third = client.post(url, json={"text": "meeting tomorrow report"}, headers=auth(key))
    assert third.headers["X-Cache"] == "MISS"
    # no-store: every step bypasses the cache.
    fourth = client.post(
        url, json={"text": TEXT}, headers={**auth(key), "Cache-Control": "no-store"}
    )
    assert fourth.headers["X-Cache"] == "BYPASS" and int(fourth.headers["X-Tokens-Used"]) > 0


def test_a_failing_step_answers_with_its_own_error_and_its_name(client: TestClient) -> None:
    key = new_key(client, token_quota=100_000)
    body = with_input(1, labels=["good", "bad"])  # not tiny-cls's labels: its own 422
    save(client, key, body)
    r = client.post(f"/pipelines/{CHAIN['name']}", json={"text": TEXT}, headers=auth(key))
    assert r.status_code == 422, r.text
    error = r.json()
    assert error["details"]["step"] == "cls"
    assert error["details"]["field"] == "labels"  # the endpoint's own details are kept
    assert "ham" in error["message"]
    # The step that ran was charged.
    _, emo_tokens = direct(
        client, new_key(client), "/v1/emotion", {"text": TEXT, "model": "tiny-embed"}
    )
    assert client.get("/v1/balance", headers=auth(key)).json()["spent"] == emo_tokens


def test_a_missing_model_is_the_steps_404(client: TestClient, predict_key: str) -> None:
    save(client, predict_key, with_input(0, model="no-such-model"))
    r = client.post(f"/pipelines/{CHAIN['name']}", json={"text": TEXT}, headers=auth(predict_key))
    assert r.status_code == 404
    assert r.json()["code"] == "MODEL_NOT_FOUND" and r.json()["details"]["step"] == "emo"


@pytest.mark.parametrize(
    ("given", "status", "details"),
    [
        ({"txt": TEXT}, 422, {"step": "emo", "reference": "$.input.text", "field": "text"}),
        ({"text": 5}, 422, {"step": "emo", "field": "text"}),  # the endpoint's own check
    ],
)
def test_input_errors_name_the_step(
    client: TestClient,
    predict_key: str,
    given: dict[str, Any],
    status: int,
    details: dict[str, Any],
) -> None:
    save(client, predict_key)
    r = client.post(f"/pipelines/{CHAIN['name']}", json=given, headers=auth(predict_key))
    assert r.status_code == status, r.text
    assert details.items() <= r.json()["details"].items()


def test_a_body_that_is_not_an_object_is_422(client: TestClient, predict_key: str) -> None:
    save(client, predict_key)
    r = client.post(f"/pipelines/{CHAIN['name']}", json=[TEXT], headers=auth(predict_key))
    assert r.status_code == 422


def test_dotted_paths_and_list_indexes(client: TestClient, predict_key: str) -> None:
    body = {
        "name": "paths",
        "steps": [
            {
                "name": "cls",
                "endpoint": "/v1/classify",
                "input": {"text": "$.input.texts.1", "labels": LABELS, "model": "tiny-cls"},
            },
            {
                "name": "vec",
                "endpoint": "/v1/text-vectorisation",
                "input": {
                    "text": ["$.steps.cls.label", "$.input.doc.title"],
                    "model": "tiny-embed",
                },
            },
        ],
    }
    save(client, predict_key, body)
    given = {"texts": ["first", TEXT], "doc": {"title": "report"}}
    r = client.post("/pipelines/paths", json=given, headers=auth(predict_key))
    assert r.status_code == 200, r.text
    run = r.json()
    cls, _ = direct(
        client, predict_key, "/v1/classify", {"text": TEXT, "labels": LABELS, "model": "tiny-cls"}
    )
    assert run["steps"]["cls"]["label"] == cls["label"]
    vec, _ = direct(
        client, predict_key, "/v1/text-vectorisation",
        {"text": [cls["label"], "report"], "model": "tiny-embed"},
    )  # fmt: skip
    assert run["output"] == vec
    short = client.post("/pipelines/paths", json={"texts": ["one"]}, headers=auth(predict_key))
    assert short.status_code == 422
    assert "list of 1" in short.json()["message"] and short.json()["details"]["step"] == "cls"


def test_independent_steps_form_waves() -> None:
    def step(name: str, text: str) -> Step:
        return Step(name=name, endpoint="/v1/emotion", input={"text": text})

    p = Pipeline(
        name="dag",
        steps=[
            step("a", "$.input.text"),
            step("b", "$.input.text"),
            step("c", "$.steps.a.output"),
            step("d", "$.steps.b.output"),
            Step(
                name="e",
                endpoint="/v1/text-vectorisation",
                input={"text": ["$.steps.c.output", "$.steps.d.output"]},
            ),
        ],
    )
    assert [[s.name for s in wave] for wave in waves(p)] == [["a", "b"], ["c", "d"], ["e"]]


def test_a_dag_runs(client: TestClient, predict_key: str) -> None:
    body = {
        "name": "dag",
        "steps": [
            {"name": "emo", "endpoint": "/v1/emotion",
             "input": {"text": "$.input.text", "model": "tiny-embed"}},
            {"name": "cls", "endpoint": "/v1/classify",
             "input": {"text": "$.input.text", "labels": LABELS, "model": "tiny-cls"}},
            {"name": "both", "endpoint": "/v1/text-vectorisation",
             "input": {"text": ["$.steps.emo.output", "$.steps.cls.label"], "model": "tiny-embed"}},
        ],
    }  # fmt: skip
    save(client, predict_key, body)
    r = client.post("/pipelines/dag", json={"text": TEXT}, headers=auth(predict_key))
    assert r.status_code == 200, r.text
    run = r.json()
    assert len(run["output"]["vector"]) == 2 and list(run["steps"]) == ["emo", "cls", "both"]


# ---- owners ------------------------------------------------------------------------------------
def test_another_keys_pipeline_does_not_exist_for_it(client: TestClient) -> None:
    a, b = new_key(client, ["predict", "jobs"]), new_key(client, ["predict", "jobs"])
    admin = new_key(client, ["admin"])
    save(client, a)
    name = CHAIN["name"]
    assert client.get("/v1/pipelines", headers=auth(b)).json()["data"] == []
    for method, url, kwargs in [
        ("GET", f"/v1/pipelines/{name}", {}),
        ("DELETE", f"/v1/pipelines/{name}", {}),
        ("POST", f"/pipelines/{name}", {"json": {"text": TEXT}}),
        ("POST", f"/v1/pipelines/{name}/run", {"json": {"text": TEXT}}),
        ("GET", f"/pipelines/{name}", {"params": {"text": TEXT}}),
        ("GET", f"/pipelines/{name}", {}),
    ]:
        r = client.request(method, url, headers=auth(b), **kwargs)
        assert r.status_code == 404, (method, url, r.text)
        assert r.json()["details"] == {"pipeline": name}
    job = client.post(
        "/v1/batch", params={"endpoint": f"/pipelines/{name}"}, content=b'{"text": "x"}\n',
        headers={**auth(b), "Content-Type": "application/x-ndjson"},
    )  # fmt: skip
    assert job.status_code == 404
    # The name is taken: 409, without saying by whom.
    assert client.post("/v1/pipelines", json=CHAIN, headers=auth(b)).status_code == 409
    # An admin sees and may delete it; the owner still has it until then.
    assert [p["name"] for p in client.get("/v1/pipelines", headers=auth(admin)).json()["data"]] == [
        name
    ]
    assert client.get(f"/v1/pipelines/{name}", headers=auth(a)).status_code == 200
    assert client.delete(f"/v1/pipelines/{name}", headers=auth(admin)).status_code == 200
    assert client.get(f"/v1/pipelines/{name}", headers=auth(a)).status_code == 404


def test_an_admins_pipeline_is_shared(client: TestClient) -> None:
    admin, key = new_key(client, ["admin"]), new_key(client)
    assert save(client, admin)["owner"] is None
    r = client.post(f"/pipelines/{CHAIN['name']}", json={"text": TEXT}, headers=auth(key))
    assert r.status_code == 200
    assert client.delete(f"/v1/pipelines/{CHAIN['name']}", headers=auth(key)).status_code == 403


class _Key:
    def __init__(self, key_id: str, admin: bool = False) -> None:
        self.id, self.admin = key_id, admin

    def allows_scope(self, scope: str) -> bool:
        return self.admin


def _pipeline(name: str) -> Pipeline:
    return Pipeline(
        name=name, steps=[Step(name="s", endpoint="/v1/emotion", input={"text": "$.input.t"})]
    )


@pytest.fixture(params=["local", "postgres"])
def make_store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[[int], PipelineStore]]:
    """Every PipelineStore implementation, for the same contract: the file and PostgreSQL."""
    if request.param == "local":
        yield lambda n: LocalPipelineStore(tmp_path / "pipelines.json", max_per_key=n)
        return
    from appliance.cluster.classifiers import PgPipelineStore
    from appliance.cluster.database import Database
    from appliance.cluster.health import BackendHealth

    db = Database(request.getfixturevalue("postgres").new_database(), BackendHealth())
    db.open()
    yield lambda n: PgPipelineStore(db, None, max_per_key=n)
    db.close()


def test_store_contract(make_store: Callable[[int], PipelineStore]) -> None:
    store = make_store(2)
    assert isinstance(store, PipelineStore)
    a: Owner = _Key("a")  # type: ignore[assignment]
    b: Owner = _Key("b")  # type: ignore[assignment]
    admin: Owner = _Key("root", admin=True)  # type: ignore[assignment]
    assert store.create(_pipeline("one"), who=a).owner == "a"
    store.create(_pipeline("two"), who=a)
    with pytest.raises(PipelineLimit):
        store.create(_pipeline("three"), who=a)
    store.create(_pipeline("three"), who=b)
    assert store.create(_pipeline("shared"), who=admin).owner is None  # not counted either
    assert [p.name for p in store.list(a)] == ["one", "two", "shared"]
    assert [p.name for p in store.list(b)] == ["three", "shared"]
    assert [p.name for p in store.list(admin)] == ["one", "two", "three", "shared"]
    assert store.get("one", a).steps[0].input == {"text": "$.input.t"}
    with pytest.raises(NotFound):
        store.get("three", a)
    with pytest.raises(NotFound):
        store.delete("three", a)
    with pytest.raises(Conflict):  # names are global
        store.create(_pipeline("three"), who=a)
    with pytest.raises(Conflict):
        store.create(_pipeline("one"), who=a)
    replaced = _pipeline("one")
    replaced.description = "new"
    assert store.create(replaced, replace=True, who=a).description == "new"
    with pytest.raises(Forbidden):  # a shared one: only an admin changes it
        store.delete("shared", b)
    store.delete("three", admin)
    store.delete("one", a)
    assert [p.name for p in store.list(admin)] == ["two", "shared"]
    with pytest.raises(ValidationFailed):  # validated whatever the caller
        store.create(Pipeline(name="x", steps=[]), who=a)


def test_local_store_file_and_reload(tmp_path: Path) -> None:
    path = tmp_path / "pipelines.json"
    store = LocalPipelineStore(path)
    a: Owner = _Key("a")  # type: ignore[assignment]
    store.create(_pipeline("one"), who=a)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert not list(tmp_path.glob(".*.tmp"))
    again = LocalPipelineStore(path)
    assert [(p.name, p.owner) for p in again.list(a)] == [("one", "a")]
    assert json.loads(path.read_text())["pipelines"][0]["name"] == "one"  # plain JSON


def test_max_per_key_is_configured(serve, models_dir: Path) -> None:  # type: ignore[no-untyped-def]
    client = serve(models_dir, APPLIANCE_PIPELINES__MAX_PER_KEY="1")
    key = new_key(client)
    save(client, key)
    r = client.post("/v1/pipelines", json={**CHAIN, "name": "second"}, headers=auth(key))
    assert r.status_code == 422 and r.json()["code"] == "PIPELINE_LIMIT"


def test_pipelines_survive_a_restart(serve, models_dir: Path) -> None:  # type: ignore[no-untyped-def]
    first = serve(models_dir)
    key = new_key(first)
    save(first, key)
    second = serve(models_dir, data=first.data_dir)
    r = second.post(f"/pipelines/{CHAIN['name']}", json={"text": TEXT}, headers=auth(key))
    assert r.status_code == 200, r.text


# ---- the GET form ------------------------------------------------------------------------------
def test_get_runs_with_the_query_as_input(client: TestClient, predict_key: str) -> None:
    saved = save(client, predict_key)
    url = f"/pipelines/{CHAIN['name']}"
    posted = client.post(url, json={"text": TEXT}, headers=auth(predict_key))
    got = client.get(url, params={"text": TEXT}, headers=auth(predict_key))
    assert got.status_code == 200, got.text
    assert got.json()["steps"]["emo"] == posted.json()["steps"]["emo"]
    assert without_timings(got.json()["output"]) == without_timings(posted.json()["output"])
    assert got.headers["X-Cache"] == "HIT"  # the very same steps, so the same cache entries
    # No query parameters: the pipeline's details, as GET /v1/pipelines/{name}.
    details = client.get(url, headers=auth(predict_key))
    assert details.status_code == 200 and details.json() == saved
    # The same errors as POST.
    bad = client.get(url, params={"txt": TEXT}, headers=auth(predict_key))
    assert bad.status_code == 422 and bad.json()["details"]["reference"] == "$.input.text"


def test_get_repeated_parameters_are_a_list(client: TestClient, predict_key: str) -> None:
    body = {
        "name": "vec",
        "steps": [
            {"name": "v", "endpoint": "/v1/text-vectorisation",
             "input": {"text": "$.input.text", "model": "tiny-embed"}},
        ],
    }  # fmt: skip
    save(client, predict_key, body)
    r = client.get("/pipelines/vec?text=a&text=b", headers=auth(predict_key))
    assert r.status_code == 200, r.text
    assert len(r.json()["output"]["vector"]) == 2


# ---- as a batch job ----------------------------------------------------------------------------
def test_a_pipeline_as_a_batch_job(client: TestClient) -> None:
    key = new_key(client, ["predict", "jobs"])
    save(client, key)
    lines = [{"text": TEXT}, {"txt": "no text"}, {"text": "meeting tomorrow"}]
    body = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    r = client.post(
        "/v1/batch", params={"endpoint": f"/pipelines/{CHAIN['name']}"}, content=body,
        headers={**auth(key), "Content-Type": "application/x-ndjson"},
    )  # fmt: skip
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    assert client.post(f"/v1/batch/{job_id}/start", headers=auth(key)).status_code == 200
    deadline = time.monotonic() + 60
    while (job := client.get(f"/v1/batch/{job_id}", headers=auth(key)).json())[
        "status"
    ] == "running":
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    assert job["status"] == "completed" and job["failed"] == 1, job
    out = [
        json.loads(x)
        for x in client.get(f"/v1/batch/{job_id}/results", headers=auth(key)).text.splitlines()
    ]
    assert [o["status"] for o in out] == [200, 422, 200]
    live = client.post(f"/pipelines/{CHAIN['name']}", json={"text": TEXT}, headers=auth(key)).json()
    assert out[0]["response"]["steps"]["emo"] == live["steps"]["emo"]
    assert without_timings(out[0]["response"]["output"]) == without_timings(live["output"])
    assert out[1]["error"]["details"]["step"] == "emo"
    assert job["tokens"] == sum(o["response"]["tokens"] for o in out if o["status"] == 200)
    assert job["tokens"] > 0


def test_a_job_fails_when_its_pipeline_is_deleted(client: TestClient) -> None:
    key = new_key(client, ["predict", "jobs"])
    save(client, key)
    r = client.post(
        "/v1/batch", params={"endpoint": f"/pipelines/{CHAIN['name']}"},
        content=b'{"text": "x"}\n', headers={**auth(key), "Content-Type": "application/x-ndjson"},
    )  # fmt: skip
    job_id = r.json()["id"]
    client.delete(f"/v1/pipelines/{CHAIN['name']}", headers=auth(key))
    assert client.post(f"/v1/batch/{job_id}/start", headers=auth(key)).status_code == 200
    deadline = time.monotonic() + 60
    while (job := client.get(f"/v1/batch/{job_id}", headers=auth(key)).json())[
        "status"
    ] == "running":
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    assert job["status"] == "failed" and job["error"]["code"] == "NOT_FOUND", job


# ---- documents ---------------------------------------------------------------------------------
def test_extract_gives_a_documents_text(client: TestClient, predict_key: str) -> None:
    for data in (make_pdf([TEXT, "meeting tomorrow"]), make_docx([TEXT, "meeting tomorrow"])):
        r = client.post("/v1/extract", json={"file": b64(data)}, headers=auth(predict_key))
        assert r.status_code == 200, r.text
        assert TEXT in r.json()["text"] and "meeting tomorrow" in r.json()["text"]
        assert r.json()["characters"] == len(r.json()["text"])
    bad = client.post("/v1/extract", json={"file": b64(b"plain")}, headers=auth(predict_key))
    assert bad.status_code == 422 and bad.json()["details"]["field"] == "file"


def test_a_pdf_then_classification(client: TestClient, predict_key: str) -> None:
    body = {
        "name": "pdf-triage",
        "steps": [
            {"name": "doc", "endpoint": "/v1/extract", "input": {"file": "$.input.file"}},
            {"name": "cls", "endpoint": "/v1/classify",
             "input": {"text": "$.steps.doc.text", "labels": LABELS, "model": "tiny-cls"}},
        ],
    }  # fmt: skip
    save(client, predict_key, body)
    pdf = b64(make_pdf([TEXT]))
    r = client.post("/pipelines/pdf-triage", json={"file": pdf}, headers=auth(predict_key))
    assert r.status_code == 200, r.text
    cls, _ = direct(
        client, new_key(client), "/v1/classify",
        {"file": pdf, "labels": LABELS, "model": "tiny-cls"},
    )  # fmt: skip
    assert without_timings(r.json()["output"]) == without_timings(cls)
    assert r.json()["tokens"] == r.json()["output"]["tokens"] > 0
    bad = client.post(
        "/pipelines/pdf-triage", json={"file": "bm90IGEgcGRm"}, headers=auth(predict_key)
    )
    assert bad.status_code == 422 and bad.json()["details"] == {"field": "file", "step": "doc"}


# ---- generation -> classification (the README's example, on a tiny GPT-2) ----------------------
@pytest.fixture(scope="module")
def gen_and_cls(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Path:
    from exporters.export import export_model
    from tests.generation_models import build_tiny_gpt2

    out = tmp_path_factory.mktemp("pipeline-models")
    folder = build_tiny_gpt2(tmp_path_factory.mktemp("gpt2") / "tiny-gpt2")
    export_model(folder, "text-generation", out_dir=out, slug="tiny-gpt2")
    shutil.copytree(models_dir / "tiny-cls", out / "tiny-cls")
    return out


def test_generation_then_classification(serve, gen_and_cls: Path) -> None:  # type: ignore[no-untyped-def]
    client = serve(gen_and_cls)
    key = new_key(client)
    body = {
        "name": "write-then-triage",
        "steps": [
            {"name": "draft", "endpoint": "/v1/text-generation",
             "input": {"text": "$.input.prompt", "max_length": 8, "model": "tiny-gpt2"}},
            {"name": "triage", "endpoint": "/v1/classify",
             "input": {"text": "$.steps.draft.output", "labels": LABELS, "model": "tiny-cls"}},
        ],
    }  # fmt: skip
    save(client, key, body)
    r = client.post("/pipelines/write-then-triage", json={"prompt": "win money"}, headers=auth(key))
    assert r.status_code == 200, r.text
    run = r.json()
    other = new_key(client)
    draft, gen_tokens = direct(
        client, other, "/v1/text-generation",
        {"text": "win money", "max_length": 8, "model": "tiny-gpt2"},
    )  # fmt: skip
    assert run["steps"]["draft"] == draft
    triage, cls_tokens = direct(
        client, other, "/v1/classify",
        {"text": draft["output"], "labels": LABELS, "model": "tiny-cls"},
    )  # fmt: skip
    assert without_timings(run["output"]) == without_timings(triage)
    assert run["tokens"] == gen_tokens + cls_tokens
    # Streaming is HTTP-only: a step asking for it gets the endpoint's 422, naming the step.
    streamed = copy.deepcopy(body)
    streamed["name"] = "streamed"
    streamed["steps"][0]["input"]["stream"] = True
    save(client, key, streamed)
    r = client.post("/pipelines/streamed", json={"prompt": "win money"}, headers=auth(key))
    assert r.status_code == 422 and r.json()["details"] == {"field": "stream", "step": "draft"}


def test_a_run_is_logged_as_the_pipeline_with_every_steps_tokens(client: TestClient) -> None:
    key = new_key(client)
    save(client, key)
    run = client.post(f"/pipelines/{CHAIN['name']}", json={"text": TEXT}, headers=auth(key))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the usage log is written by a background thread
        logs = client.get("/v1/logs", headers=auth(key)).json()["data"]
        runs = [e for e in logs if e["endpoint"] == f"POST /pipelines/{CHAIN['name']}"]
        if runs:
            break
        time.sleep(0.05)
    assert [(e["model"], e["tokens"], e["status"]) for e in runs] == [
        (f"pipeline:{CHAIN['name']}", run.json()["tokens"], 200)
    ]


def test_a_pdf_then_summarisation_then_classification(serve, gen_and_cls: Path) -> None:  # type: ignore[no-untyped-def]
    """The README's first example. No seq2seq model is installed, so the summarisation step is
    answered by the instruct generator (the QA/summarisation fallback), as after `make serve`."""
    client = serve(gen_and_cls)
    key = new_key(client)
    body = {
        "name": "pdf-summary-triage",
        "steps": [
            {"name": "read", "endpoint": "/v1/extract", "input": {"file": "$.input.file"}},
            {"name": "summary", "endpoint": "/v1/summarisation",
             "input": {"text": "$.steps.read.text", "max_length": 8}},
            {"name": "triage", "endpoint": "/v1/classify",
             "input": {"text": "$.steps.summary.output", "labels": LABELS, "model": "tiny-cls"}},
        ],
    }  # fmt: skip
    save(client, key, body)
    pdf = b64(make_pdf([TEXT, "the invoice total is wrong"]))
    r = client.post("/pipelines/pdf-summary-triage", json={"file": pdf}, headers=auth(key))
    assert r.status_code == 200, r.text
    run = r.json()
    other = new_key(client)
    read = client.post("/v1/extract", json={"file": pdf}, headers=auth(other)).json()
    assert run["steps"]["read"] == read and "invoice total" in read["text"]
    summary, sum_tokens = direct(
        client, other, "/v1/summarisation", {"text": read["text"], "max_length": 8}
    )
    assert run["steps"]["summary"] == summary and sum_tokens > 0  # the generator ran
    triage, cls_tokens = direct(
        client, other, "/v1/classify",
        {"text": summary["output"], "labels": LABELS, "model": "tiny-cls"},
    )  # fmt: skip
    assert without_timings(run["output"]) == without_timings(triage)
    assert run["tokens"] == sum_tokens + cls_tokens  # reading a PDF costs no tokens
