"""Settings: precedence file < environment < flags; unknown keys and bad values name the key."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from appliance.config import ConfigError, Settings, load_settings


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_defaults(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, ""), environ={})
    assert (s.server.host, s.server.port) == ("127.0.0.1", 8080)
    assert s.server.max_body_bytes == 1_048_576
    assert s.runtime.providers == ["CPUExecutionProvider"]


def test_relative_paths_in_the_file_are_relative_to_it(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, 'data_dir = "state"\n'), environ={})
    assert s.data_path == tmp_path.resolve() / "state"
    assert s.keys_path == tmp_path.resolve() / "state" / "keys.json"


def test_precedence(tmp_path: Path) -> None:
    cfg = write(tmp_path, "[server]\nport = 1000\nhost = '0.0.0.0'\n")
    env = {"APPLIANCE_SERVER__PORT": "2000", "APPLIANCE_DATA_DIR": "/srv/data"}
    s = load_settings(cfg, environ=env)
    assert (s.server.port, s.server.host, s.data_dir) == (2000, "0.0.0.0", "/srv/data")
    s = load_settings(cfg, environ=env, overrides={"server": {"port": 3000}})
    assert s.server.port == 3000


def test_the_projects_other_variables_are_not_settings(tmp_path: Path) -> None:
    # APPLIANCE_KEY / APPLIANCE_URL are the batch CLI's; a shell that exports them (as the
    # console's example curl does) still starts the server and runs every command.
    env = {
        "APPLIANCE_KEY": "apl_x",
        "APPLIANCE_URL": "http://127.0.0.1:1",
        "APPLIANCE_CONSOLE_SCREENSHOTS": "docs/console",
        "APPLIANCE_CONFIG": "elsewhere.toml",
        "APPLIANCE_SERVER__PORT": "2000",
    }
    assert load_settings(write(tmp_path, ""), environ=env).server.port == 2000


def test_list_from_the_environment_as_json(tmp_path: Path) -> None:
    env = {"APPLIANCE_RUNTIME__PROVIDERS": '["CUDAExecutionProvider", "CPUExecutionProvider"]'}
    s = load_settings(write(tmp_path, ""), environ=env)
    assert s.runtime.providers[0] == "CUDAExecutionProvider"


@pytest.mark.parametrize(
    "text,env,named",
    [
        ("[server]\nprot = 1\n", {}, "prot"),
        ("[server]\nport = 'http'\n", {}, "server.port"),
        ("[server]\nport = 70000\n", {}, "server.port"),
        ("[runtime]\nmax_batch_size = 0\n", {}, "runtime.max_batch_size"),
        ("colour = 'blue'\n", {}, "colour"),
        ("", {"APPLIANCE_SERVER__PORT": "eighty"}, "server.port"),
        ("", {"APPLIANCE_NOPE": "1"}, "nope"),
        ("[server\n", {}, "config.toml"),
    ],
)
def test_bad_settings_name_the_key(
    tmp_path: Path, text: str, env: dict[str, str], named: str
) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_settings(write(tmp_path, text), environ=env)


def test_missing_explicit_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.toml", environ={})


def test_the_shipped_config_file_names_every_setting_with_its_default() -> None:
    # README: "the commented copy in this repository [lists] every key and its default".
    text = (Path(__file__).parent.parent / "config.toml").read_text()
    section, found = "", {}
    for line in text.splitlines():
        line = line.lstrip("# ").split("#")[0].strip()
        if line.startswith("["):
            section = line.strip("[]").split(".")[0]
        elif "=" in line:
            found[(section, line.split("=")[0].strip())] = line.split("=", 1)[1].strip()
    defaults = Settings()
    live = load_settings(Path(__file__).parent.parent / "config.toml", environ={})
    for name in Settings.__struct_fields__:
        value = getattr(defaults, name)
        if isinstance(value, msgspec.Struct):
            for field in value.__struct_fields__:
                assert (name, field) in found, f"{name}.{field} is not in config.toml"
                if field != "replica_id":  # the hostname, commented out in the file
                    assert getattr(getattr(live, name), field) == getattr(value, field), (
                        f"{name}.{field}: config.toml's value is not the default"
                    )
        elif isinstance(value, str):
            assert found.get(("", name)) == f'"{value}"', name
        else:
            assert any(section == name for section, _ in found), f"[{name}] is not in config.toml"
