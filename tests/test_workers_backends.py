"""The local backends of server.workers > 1, each with two instances on one data dir standing
for two worker processes (and real child processes where dying or racing matters)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance.classifiers import Classifier, ClassifierStore
from appliance.errors import Conflict, InsufficientBalance
from appliance.gateway.keys import KeyStore
from appliance.workers.limits import SharedUsageLog
from appliance.workers.shared import FileEvents, FileLeases, SqliteShared

ROOT = Path(__file__).parent.parent


def run_children(code: str, n: int) -> None:
    """`code` in n processes started together; each must exit 0."""
    procs = [subprocess.Popen([sys.executable, "-c", code, str(i)], cwd=ROOT) for i in range(n)]
    assert [p.wait(60) for p in procs] == [0] * n


def test_a_lease_is_held_by_one_holder_and_freed_when_its_process_dies(tmp_path: Path) -> None:
    one, two = FileLeases(tmp_path), FileLeases(tmp_path)
    assert one.acquire("batch_1") and one.acquire("batch_1")  # its own: still its own
    assert not two.acquire("batch_1")
    assert two.acquire("batch_1", "build_leases")  # another table, another lease
    assert one.renew("batch_1") and not two.renew("batch_1")
    one.release("batch_1")
    assert two.acquire("batch_1")
    two.close()
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from pathlib import Path\n"
            "from appliance.workers.shared import FileLeases\n"
            f"assert FileLeases(Path({str(tmp_path)!r})).acquire('batch_2')\n"
            "print('held', flush=True)\n"
            "time.sleep(60)\n",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None and child.stdout.readline().strip() == "held"
    assert not one.acquire("batch_2")
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert one.acquire("batch_2")  # the kernel dropped the dead holder's lock


def test_an_upload_grant_is_redeemed_once_by_any_worker(tmp_path: Path) -> None:
    one, two = SqliteShared(tmp_path / "w.db"), SqliteShared(tmp_path / "w.db")
    one.put("tok", "my-model", "feature-extraction", time.time() + 60)
    one.put("old", "gone", None, time.time() - 1)
    assert two.take("tok")[:2] == ("my-model", "feature-extraction")  # type: ignore[index]
    assert one.take("tok") is None and two.take("tok") is None
    assert two.take("old") is None  # expired


def test_workers_starting_together_agree_on_one_secret(tmp_path: Path) -> None:
    out = tmp_path / "secrets"
    out.mkdir()
    run_children(
        "import sys\n"
        "from pathlib import Path\n"
        "from appliance.workers.shared import SqliteShared\n"
        f"s = SqliteShared(Path({str(tmp_path / 'w.db')!r})).get('console')\n"
        f"Path({str(out)!r}, sys.argv[1]).write_text(s.hex())\n",
        6,
    )
    values = {p.read_text() for p in out.iterdir()}
    assert len(values) == 1 and len(values.pop()) == 64


def test_quota_spend_from_racing_processes_never_exceeds_the_quota(tmp_path: Path) -> None:
    path = tmp_path / "usage.db"
    SharedUsageLog(path, retention_days=1).spent("warm")  # the table exists before the race
    run_children(
        "from pathlib import Path\n"
        "from appliance.errors import InsufficientBalance\n"
        "from appliance.workers.limits import SharedUsageLog\n"
        f"log = SharedUsageLog(Path({str(path)!r}), retention_days=1)\n"
        "for _ in range(40):\n"
        "    try:\n"
        "        log.reserve('k', 100, 3)\n"
        "    except InsufficientBalance:\n"
        "        pass\n",
        4,
    )
    log = SharedUsageLog(path, retention_days=1)
    assert log.spent("k") == 99  # 33 reservations of 3 fit in 100, of 160 tried
    with pytest.raises(InsufficientBalance):
        log.reserve("k", 100, 3)
    log.refund("k", 9)
    assert log.spent("k") == 90


def test_a_classifier_saved_by_one_store_is_seen_by_the_other(tmp_path: Path) -> None:
    path = tmp_path / "classifiers.json"
    one, two = ClassifierStore(path, shared=True), ClassifierStore(path, shared=True)
    one.create(Classifier(name="a", labels=["x", "y"]))
    assert [c.name for c in two.list()] == ["a"]
    with pytest.raises(Conflict):
        two.create(Classifier(name="a", labels=["x", "y"]))
    two.create(Classifier(name="b", labels=["x", "y"]))  # written from the file, not memory
    assert [c.name for c in one.list()] == ["a", "b"]
    one.delete("a")
    assert [c.name for c in two.list()] == ["b"]


def test_classifiers_saved_by_racing_processes_are_all_kept(tmp_path: Path) -> None:
    path = tmp_path / "classifiers.json"
    run_children(
        "import sys\n"
        "from pathlib import Path\n"
        "from appliance.classifiers import Classifier, ClassifierStore\n"
        f"store = ClassifierStore(Path({str(path)!r}), shared=True)\n"
        "for i in range(10):\n"
        "    store.create(Classifier(name=f'c{sys.argv[1]}-{i}', labels=['x', 'y']))\n",
        4,
    )
    assert len(ClassifierStore(path).list()) == 40  # no write lost another's


def test_a_key_made_and_revoked_at_once_elsewhere_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    here, there = KeyStore(path), KeyStore(path)
    there.create("first", ["predict"])
    assert len(here.list()) == 1
    key, secret = there.create("k", ["predict"])
    assert here.authenticate(secret) is not None
    there.revoke(key.id)  # within the same mtime tick, often: the inode still changes
    assert here.authenticate(secret) is None


def test_a_model_change_published_by_one_worker_reaches_the_others(tmp_path: Path) -> None:
    one, two = FileEvents(tmp_path), FileEvents(tmp_path)
    got_one: list[dict[str, str]] = []
    got_two: list[dict[str, str]] = []
    one.on("models", got_one.append)
    two.on("models", got_two.append)
    one.publish("models", slug="m", change="removed")
    one.poll()
    two.poll()
    assert got_one == []  # its own change is not news to it
    assert got_two == [{"slug": "m", "change": "removed", "origin": one.origin}]
    two.poll()
    assert len(got_two) == 1  # seen once


def test_each_worker_sizes_its_sessions_to_its_share_of_the_cores() -> None:
    from appliance.config import RuntimeConfig
    from appliance.runtime.session import plan_streams, usable_cores

    cores = usable_cores()
    config = RuntimeConfig()
    assert plan_streams(config, "feature-extraction") == (cores, 1)
    assert plan_streams(config, "feature-extraction", workers=2) == (max(1, cores // 2), 1)
    assert plan_streams(config, "feature-extraction", workers=cores * 4) == (1, 1)  # at least 1
    assert plan_streams(config, "text-generation", workers=2) == (1, max(1, cores // 2))


def test_with_cluster_backends_each_worker_is_its_own_replica(tmp_path: Path) -> None:
    from appliance.workers.supervisor import worker_settings
    from tests.conftest import make_settings

    single = make_settings(tmp_path / "a", tmp_path / "m")
    assert worker_settings(single, 1) is single
    cluster = make_settings(
        tmp_path / "b",
        tmp_path / "m",
        APPLIANCE_CLUSTER__DATABASE_URL="postgresql://h/db",
        APPLIANCE_CLUSTER__REDIS_URL="redis://h/0",
        APPLIANCE_CLUSTER__REPLICA_ID="box",
    )
    names = {worker_settings(cluster, i).cluster.replica_id for i in range(3)}
    assert names == {"box-w0", "box-w1", "box-w2"}
    assert worker_settings(cluster, 0).cluster.database_url == "postgresql://h/db"


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_starting_worker_leaves_another_workers_upload_alone(
    tmp_path: Path, workers: str
) -> None:
    from appliance.models.builds import Builds
    from tests.conftest import make_settings

    settings = make_settings(tmp_path / "data", tmp_path / "m", APPLIANCE_SERVER__WORKERS=workers)
    uploads = settings.data_path / "uploads"
    (uploads / "staging-now").mkdir(parents=True)
    (uploads / "now.zip").write_bytes(b"PK")  # being received by another worker
    (uploads / "crashed.zip").write_bytes(b"PK")
    long_ago = time.time() - settings.models.build_timeout_seconds - 60
    os.utime(uploads / "crashed.zip", (long_ago, long_ago))
    Builds(settings, registry=None)  # type: ignore[arg-type]
    left = sorted(p.name for p in uploads.iterdir())
    # One process: everything there is its own previous run's. Several: only the untouched.
    assert left == ([] if workers == "1" else ["now.zip", "staging-now"])
