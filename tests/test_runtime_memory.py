"""Process-wide memory settings a serving process makes at start (appliance.runtime.memory)."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import pytest

from appliance import server
from appliance.config import load_settings
from appliance.runtime import memory


@pytest.fixture
def gc_threshold() -> Any:
    before = gc.get_threshold()
    yield before
    gc.set_threshold(*before)


def test_a_serving_process_collects_young_objects_less_often(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gc_threshold: tuple[int, int, int]
) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\nmodels_dir = "{tmp_path / "models"}"\n')
    seen: list[tuple[int, int, int]] = []

    class Started:
        def run(self, **_: Any) -> None:  # what uvicorn would serve under
            seen.append(gc.get_threshold())

    monkeypatch.setattr(server, "limit_malloc_arenas", lambda: False)  # not this test process
    monkeypatch.setattr(server, "_server", lambda settings, lifecycle: Started())
    gc.set_threshold(700, 10, 10)  # CPython's defaults
    server.run(load_settings(config, environ={}))
    assert seen == [(memory.YOUNG_OBJECTS, 10, 10)]
