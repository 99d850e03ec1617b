"""The key file: hashed secrets only, mode 0600, atomic rewrites, re-read on change."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from appliance.gateway.keys import KeyStore, KeyStoreError


def test_secret_is_never_stored(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys.json")
    key, secret = store.create("ci", ["predict"])
    raw = (tmp_path / "keys.json").read_text()
    assert secret not in raw
    assert key.hash in raw
    assert secret.startswith("apl_") and len(secret) > 40


def test_file_mode_is_0600(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys.json")
    store.create("a", ["predict"])
    store.create("b", ["admin"])
    assert stat.S_IMODE((tmp_path / "keys.json").stat().st_mode) == 0o600


def test_authenticate_and_revoke(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys.json")
    key, secret = store.create("a", ["predict"])
    assert store.authenticate(secret) == key
    assert store.authenticate(secret + "x") is None
    store.revoke(key.id)
    assert store.authenticate(secret) is None


def test_changes_by_another_process_are_seen(tmp_path: Path) -> None:
    server = KeyStore(tmp_path / "keys.json")
    cli = KeyStore(tmp_path / "keys.json")
    _, secret = cli.create("from-cli", ["predict"])
    assert server.authenticate(secret) is not None
    assert len(server.list()) == 1


@pytest.mark.parametrize("scopes", [[], ["root"], ["predict", "everything"]])
def test_bad_scopes_are_refused(tmp_path: Path, scopes: list[str]) -> None:
    with pytest.raises(KeyStoreError):
        KeyStore(tmp_path / "keys.json").create("x", scopes)


def test_revoking_an_unknown_id_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(KeyStoreError):
        KeyStore(tmp_path / "keys.json").revoke("key_nope")


def test_admin_scope_implies_the_others(tmp_path: Path) -> None:
    key, _ = KeyStore(tmp_path / "keys.json").create("a", ["admin"])
    assert key.allows_scope("predict") and key.allows_scope("jobs")


def test_an_empty_model_list_is_refused_not_all_models(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys.json")
    with pytest.raises(KeyStoreError, match="models"):
        store.create("a", ["predict"], models=[])
    assert store.create("b", ["predict"])[0].models == ["*"]
    assert store.create("c", ["predict"], models=["tiny"])[0].models == ["tiny"]
