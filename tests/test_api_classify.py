"""The classify API of seeds/classify-api.txt: classify, tag, batches, saved classifiers,
PDF and DOCX inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
from litestar.testing import TestClient

from tests.documents import b64, make_docx, make_pdf

LABELS = ["product issue", "furniture", "space"]
TEXT = "I am really mad because my product broke."


@pytest.fixture
def auth(predict_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {predict_key}"}


def test_classify(client: TestClient, auth: dict[str, str]) -> None:
    r = client.post(
        "/v1/classify", json={"text": TEXT, "labels": LABELS, "model": "tiny-embed"}, headers=auth
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"label", "confidence", "scores", "tokens", "latency_ms", "cached"}
    assert body["label"] == max(body["scores"], key=body["scores"].get)
    assert body["confidence"] == body["scores"][body["label"]]
    assert list(body["scores"]) == LABELS and body["cached"] is False
    assert body["tokens"] == int(r.headers["x-tokens-used"]) > 0
    again = client.post(
        "/v1/classify", json={"text": TEXT, "labels": LABELS, "model": "tiny-embed"}, headers=auth
    )
    assert again.json()["cached"] is True and again.json()["tokens"] == 0
    assert again.headers["x-cache"] == "HIT"


def test_classify_threshold_leaves_the_label_empty(
    client: TestClient, auth: dict[str, str]
) -> None:
    r = client.post(
        "/v1/classify",
        json={"text": TEXT, "labels": LABELS, "model": "tiny-embed", "threshold": 1.0},
        headers=auth,
    )
    assert r.json()["label"] is None and r.json()["confidence"] < 1.0


def test_tag(client: TestClient, auth: dict[str, str]) -> None:
    body = {"text": TEXT, "labels": LABELS, "model": "tiny-embed", "threshold": 0.0}
    r = client.post("/v1/tag", json=body, headers=auth)
    assert r.status_code == 200, r.text
    out = r.json()
    assert set(out) == {"labels", "scores", "tokens", "latency_ms", "cached"}
    assert sorted(out["labels"]) == sorted(LABELS)  # threshold 0: every label
    ranked = [out["scores"][label] for label in out["labels"]]
    assert ranked == sorted(ranked, reverse=True)
    none = client.post("/v1/tag", json={**body, "threshold": 1.0}, headers=auth).json()
    assert none["labels"] == []


def test_tag_with_a_fine_tuned_multi_label_model(client: TestClient, auth: dict[str, str]) -> None:
    r = client.post("/v1/tag", json={"text": TEXT, "model": "tiny-tags"}, headers=auth)
    assert r.status_code == 200, r.text
    assert set(r.json()["scores"]) == {"urgent", "billing", "bug"}


@pytest.mark.parametrize("path,key", [("/v1/classify/batch", "label"), ("/v1/tag/batch", "labels")])
def test_batches(client: TestClient, auth: dict[str, str], path: str, key: str) -> None:
    texts = [TEXT, "I would like to collaborate with you on social media", "hello"]
    r = client.post(
        path, json={"texts": texts, "labels": LABELS, "model": "tiny-embed"}, headers=auth
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"results", "tokens", "latency_ms"}
    assert len(body["results"]) == 3 and all(key in item for item in body["results"])
    single = client.post(
        path.removesuffix("/batch"),
        json={"text": texts[2], "labels": LABELS, "model": "tiny-embed"},
        headers=auth,
    ).json()
    assert body["results"][2]["scores"] == pytest.approx(single["scores"])


def test_batch_over_1000_is_422(client: TestClient, auth: dict[str, str]) -> None:
    r = client.post(
        "/v1/classify/batch",
        json={"texts": ["x"] * 1001, "labels": LABELS, "model": "tiny-embed"},
        headers=auth,
    )
    assert r.status_code == 422 and r.json()["details"]["max_items"] == 1000


def test_saved_classifiers_crud_and_use(serve, models_dir: Path) -> None:  # type: ignore[no-untyped-def]
    client = serve(models_dir)
    auth = {"x-api-key": client.keys.create("k", ["predict"])[1]}
    spec = {
        "name": "support-triage",
        "labels": LABELS,
        "model": "tiny-embed",
        "description": "tickets",
        "multi_label": True,
        "threshold": 0.2,
    }
    r = client.post("/v1/classifiers", json=spec, headers=auth)
    assert r.status_code == 201, r.text
    assert r.json()["name"] == "support-triage" and r.json()["created_at"]
    assert client.post("/v1/classifiers", json=spec, headers=auth).status_code == 409
    assert client.get("/v1/classifiers/support-triage", headers=auth).json()["labels"] == LABELS
    assert [c["name"] for c in client.get("/v1/classifiers", headers=auth).json()["data"]] == [
        "support-triage"
    ]

    used = client.post(
        "/v1/classify", json={"text": TEXT, "classifier": "support-triage"}, headers=auth
    )
    assert used.status_code == 200 and list(used.json()["scores"]) == LABELS
    direct = client.post(
        "/v1/classify", json={"text": TEXT, "labels": LABELS, "model": "tiny-embed"}, headers=auth
    )
    assert used.json()["scores"] == direct.json()["scores"]
    tagged = client.post(
        "/v1/tag", json={"text": TEXT, "classifier": "support-triage"}, headers=auth
    ).json()
    assert all(tagged["scores"][label] >= 0.2 for label in tagged["labels"])

    client.__exit__(None, None, None)  # restart: saved classifiers survive
    again = serve(models_dir, data=client.data_dir)
    auth2 = auth  # the same key, persisted: only the owner may delete its classifier
    assert again.get("/v1/classifiers/support-triage", headers=auth2).status_code == 200
    assert again.delete("/v1/classifiers/support-triage", headers=auth2).json() == {
        "name": "support-triage",
        "deleted": True,
    }
    assert again.get("/v1/classifiers/support-triage", headers=auth2).status_code == 404
    assert (
        again.post(
            "/v1/classify", json={"text": "x", "classifier": "nope"}, headers=auth2
        ).status_code
        == 404
    )


def test_classifiers_are_isolated_between_keys(serve, models_dir: Path) -> None:  # type: ignore[no-untyped-def]
    client = serve(models_dir)
    a = {"x-api-key": client.keys.create("a", ["predict"])[1]}
    b = {"x-api-key": client.keys.create("b", ["predict"])[1]}
    admin = {"x-api-key": client.keys.create("admin", ["admin"])[1]}
    spec = {"name": "mine", "labels": LABELS, "model": "tiny-embed"}
    assert client.post("/v1/classifiers", json=spec, headers=a).status_code == 201
    # B can neither see, use, delete nor replace A's classifier.
    assert client.get("/v1/classifiers", headers=b).json()["data"] == []
    gone = client.get("/v1/classifiers/mine", headers=b)
    assert gone.status_code == 404 and gone.json()["code"] == "NOT_FOUND"
    assert client.delete("/v1/classifiers/mine", headers=b).status_code == 404
    used = client.post("/v1/classify", json={"text": TEXT, "classifier": "mine"}, headers=b)
    assert used.status_code == 404
    other = {**spec, "labels": ["x", "y"], "replace": True}
    assert client.post("/v1/classifiers", json=other, headers=b).status_code == 409
    assert client.get("/v1/classifiers/mine", headers=a).json()["labels"] == LABELS
    # An admin sees and may delete it; an admin's classifiers are shared, read-only to others.
    assert [c["name"] for c in client.get("/v1/classifiers", headers=admin).json()["data"]] == [
        "mine"
    ]
    shared = {"name": "shared", "labels": LABELS, "model": "tiny-embed"}
    assert client.post("/v1/classifiers", json=shared, headers=admin).status_code == 201
    assert client.get("/v1/classifiers/shared", headers=b).status_code == 200
    ok = client.post("/v1/classify", json={"text": TEXT, "classifier": "shared"}, headers=b)
    assert ok.status_code == 200
    refused = client.delete("/v1/classifiers/shared", headers=b)
    assert refused.status_code == 403 and refused.json()["code"] == "FORBIDDEN"
    assert client.delete("/v1/classifiers/mine", headers=admin).status_code == 200
    assert oct((client.data_dir / "classifiers.json").stat().st_mode & 0o777) == "0o600"


def test_classifier_cap_is_configured(serve, models_dir: Path) -> None:  # type: ignore[no-untyped-def]
    client = serve(models_dir, APPLIANCE_CLASSIFIERS__MAX_PER_KEY="1")
    a = {"x-api-key": client.keys.create("a", ["predict"])[1]}
    spec = {"labels": LABELS, "model": "tiny-embed"}
    assert client.post("/v1/classifiers", json={**spec, "name": "x"}, headers=a).status_code == 201
    over = client.post("/v1/classifiers", json={**spec, "name": "y"}, headers=a)
    assert over.status_code == 422 and over.json()["code"] == "CLASSIFIER_LIMIT"


def test_classifier_count_is_capped_per_key(tmp_path: Path) -> None:
    from appliance.classifiers import Classifier, ClassifierLimit, ClassifierStore
    from appliance.gateway.keys import KeyStore

    keys = KeyStore(tmp_path / "keys.json")
    key = keys.create("a", ["predict"])[0]
    store = ClassifierStore(tmp_path / "c.json", max_per_key=2)
    for name in ("one", "two"):
        store.create(Classifier(name=name, labels=["x"]), who=key)
    with pytest.raises(ClassifierLimit):
        store.create(Classifier(name="three", labels=["x"]), who=key)
    # Unowned entries of an older file are shared (admin) ones.
    (tmp_path / "old.json").write_text('{"classifiers": [{"name": "old", "labels": ["x"]}]}')
    assert ClassifierStore(tmp_path / "old.json").get("old", key).owner is None


def test_the_classifier_store_is_kept_in_memory_not_reread_per_request(tmp_path: Path) -> None:
    from appliance.classifiers import Classifier, ClassifierStore
    from appliance.gateway.keys import KeyStore

    key = KeyStore(tmp_path / "keys.json").create("a", ["predict"])[0]
    path = tmp_path / "classifiers.json"
    store = ClassifierStore(path)
    store.create(Classifier(name="one", labels=["x", "y"]), who=key)
    # The file is written through (it survives a restart)...
    assert ClassifierStore(path).get("one", key).labels == ["x", "y"]
    # ...but lookups answer from memory: a file gone bad under the server changes nothing.
    path.write_bytes(b"not json at all")
    for _ in range(3):
        assert store.get("one", key).labels == ["x", "y"]
    assert [c.name for c in store.list(key)] == ["one"]


@pytest.mark.parametrize(
    "spec,status",
    [
        ({"name": "Bad Name", "labels": ["a"], "model": "tiny-embed"}, 422),
        ({"name": "ok", "labels": [], "model": "tiny-embed"}, 422),
        ({"name": "ok", "labels": ["a", "a"], "model": "tiny-embed"}, 422),
        ({"name": "ok", "labels": ["a", " "], "model": "tiny-embed"}, 422),
        ({"name": "ok", "labels": ["a"], "model": "no-such-model"}, 404),
        ({"name": "ok", "labels": ["spam"], "model": "tiny-cls"}, 201),
        ({"name": "ok", "labels": ["eggs"], "model": "tiny-cls"}, 422),
        ({"name": "ok", "labels": ["a"], "model": "tiny-embed", "threshold": 3}, 422),
    ],
)
def test_classifier_validation(
    client: TestClient, auth: dict[str, str], spec: dict, status: int
) -> None:
    r = client.post("/v1/classifiers", json=spec, headers=auth)
    assert r.status_code == status, r.text


def test_pdf_and_docx_inputs(client: TestClient, auth: dict[str, str]) -> None:
    base = {"labels": LABELS, "model": "tiny-embed"}
    from_text = client.post("/v1/classify", json={**base, "text": TEXT}, headers=auth).json()
    pdf = client.post("/v1/classify", json={**base, "file": b64(make_pdf([TEXT]))}, headers=auth)
    assert pdf.status_code == 200, pdf.text
    assert pdf.json()["scores"] == pytest.approx(from_text["scores"], abs=1e-6)
    docx = client.post("/v1/classify", json={**base, "file": b64(make_docx([TEXT]))}, headers=auth)
    assert docx.status_code == 200, docx.text
    assert docx.json()["scores"] == pytest.approx(from_text["scores"], abs=1e-6)


def test_docx_text_keeps_paragraphs_and_tables_in_order() -> None:
    import io

    import docx

    from appliance.runtime.documents import extract_text

    document = docx.Document()
    document.add_paragraph("First paragraph.")
    table = document.add_table(rows=1, cols=2)
    table.rows[0].cells[0].text = "left cell"
    table.rows[0].cells[1].text = "right cell"
    document.add_paragraph("Last paragraph.")
    out = io.BytesIO()
    document.save(out)
    text = extract_text(b64(out.getvalue()))
    assert [line for line in text.splitlines() if line] == [
        "First paragraph.",
        "left cell",
        "right cell",
        "Last paragraph.",
    ]


def test_a_docx_with_an_entity_bomb_is_refused() -> None:
    import io
    import zipfile

    from appliance.errors import ValidationFailed
    from appliance.runtime.documents import extract_text

    bomb = (
        '<?xml version="1.0"?><!DOCTYPE d [<!ENTITY a "aaaaaaaaaa">'
        '<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;"><!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;">]>'
        '<w:document xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main">'
        "<w:body><w:p><w:r><w:t>&c;</w:t></w:r></w:p></w:body></w:document>"
    )
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("[Content_Types].xml", "<Types/>")
        z.writestr("word/document.xml", bomb)
    with pytest.raises(ValidationFailed, match="DTD"):
        extract_text(b64(out.getvalue()))


@pytest.mark.parametrize(
    "file,message",
    [
        (b64(make_pdf([f"page {i}" for i in range(21)])), "pages"),
        (b64(make_docx(["x"], page_breaks=25)), "pages"),
        (b64(b"%PDF-1.4 this is not really a pdf"), "PDF"),
        (b64(b"PK\x03\x04 broken zip"), "DOCX"),
        (b64(b"just some bytes"), "PDF or a DOCX"),
        ("not base64 !!!", "base64"),
        (b64(make_pdf([""])), "no extractable text"),
    ],
    ids=[
        "pdf-21-pages",
        "docx-26-pages",
        "corrupt-pdf",
        "corrupt-docx",
        "unknown",
        "bad-base64",
        "empty",
    ],
)
def test_bad_files_are_422(
    client: TestClient, auth: dict[str, str], file: str, message: str
) -> None:
    r = client.post(
        "/v1/classify", json={"file": file, "labels": LABELS, "model": "tiny-embed"}, headers=auth
    )
    assert r.status_code == 422, r.text
    assert message in r.json()["message"]


@pytest.mark.parametrize(
    "body",
    [
        {"labels": LABELS, "model": "tiny-embed"},
        {"text": TEXT, "file": b64(make_pdf([TEXT])), "labels": LABELS, "model": "tiny-embed"},
        {"text": TEXT, "labels": LABELS, "model": "tiny-embed", "threshold": -1},
        {"text": TEXT, "model": "tiny-embed"},
    ],
    ids=["neither-text-nor-file", "both", "threshold", "embedding-model-without-labels"],
)
def test_bad_classify_requests_are_422(
    client: TestClient, auth: dict[str, str], body: dict
) -> None:
    r = client.post("/v1/classify", json=body, headers=auth)
    assert r.status_code == 422, r.text


def test_a_docx_bomb_is_a_fast_422(client: TestClient, auth: dict[str, str]) -> None:
    import time

    from tests.documents import docx_with_body

    bomb = b64(docx_with_body(b"<w:p/>" * 1_300_000))  # 7.8 MB of XML in a 40 KB file
    start = time.perf_counter()
    response = client.post(
        "/v1/classify", json={"file": bomb, "labels": LABELS, "model": "tiny-embed"}, headers=auth
    )
    assert response.status_code == 422, response.text
    assert "pages" in response.json()["message"]
    assert time.perf_counter() - start < 2.0
