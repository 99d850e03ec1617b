"""deploy/kubernetes/ renders with `kubectl kustomize`, validates against the Kubernetes schemas
and follows the practices the README promises — checked without a cluster."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from appliance.app import bootstrap_admin_key
from appliance.config import tomllib
from appliance.gateway.keys import KeyStore

ROOT = Path(__file__).resolve().parent.parent
KUBE = ROOT / "deploy" / "kubernetes"
# The newest schema set kubernetes-validate ships (it validates offline from its package data).
K8S_VERSION = "1.37.0"
COMPONENTS = ["example-backends", "servicemonitor", "prometheus-adapter-example"]
# Kinds whose schemas are CRDs, not in kubernetes-validate's set: checked by hand below.
CRD_KINDS = {"ServiceMonitor"}


def kubectl() -> str:
    # Fails rather than skips: `make test` installs kubectl (Makefile), so a missing one is a bug.
    path = shutil.which("kubectl")
    assert path, "kubectl not found: `make test` installs it (apt-get install kubectl)"
    return path


def render(tree: Path, overlay: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        [kubectl(), "kustomize", str(tree / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    # Kustomize refuses absolute paths, so the overlay with every optional component sits in a
    # copy of the tree next to the real overlays.
    tree = tmp_path_factory.mktemp("kube") / "kubernetes"
    shutil.copytree(KUBE, tree)
    (tree / "overlays" / "all").mkdir()
    (tree / "overlays" / "all" / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "resources": ["../cluster"],
                "components": [f"../../components/{c}" for c in COMPONENTS],
            }
        )
    )
    return {name: render(tree, name) for name in ("single", "cluster", "all")}


def objects(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def appliance_deployment(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (dep,) = [d for d in objects(docs, "Deployment") if d["metadata"]["name"] == "appliance"]
    return dep


@pytest.mark.parametrize("overlay", ["single", "cluster", "all"])
def test_every_object_validates_strictly(
    rendered: dict[str, list[dict[str, Any]]], overlay: str, tmp_path: Path
) -> None:
    docs = [d for d in rendered[overlay] if d["kind"] not in CRD_KINDS]
    path = tmp_path / f"{overlay}.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    validator = Path(sys.executable).parent / "kubernetes-validate"
    result = subprocess.run(
        [str(validator), "--strict", "-k", K8S_VERSION, str(path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # Every object was checked against a schema, none skipped.
    assert result.stdout.count("passed for resource") == len(docs), result.stdout


def test_components_add_what_they_promise(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["all"]
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("StatefulSet", "appliance-example-redis") in names
    assert ("StatefulSet", "appliance-example-postgresql") in names
    (monitor,) = objects(docs, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert monitor["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "appliance"}
    rules = [d for d in objects(docs, "ConfigMap") if "adapter" in d["metadata"]["name"]]
    assert "appliance_queue_depth" in rules[0]["data"]["config.yaml"]
    # The example backends are marked as examples and not shipped without the component.
    assert not objects(rendered["cluster"], "StatefulSet")


@pytest.mark.parametrize("overlay", ["single", "cluster", "all"])
def test_appliance_pod_practices(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    docs = rendered[overlay]
    dep = appliance_deployment(docs)
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    image, _, tag = c["image"].rpartition(":")
    assert image and tag == version, c["image"]

    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    budget = c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"]
    assert budget >= 30  # measured ready in 0.79 s; room for SmolLM2 and slow volumes
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"

    grace = tomllib.loads((ROOT / "config.toml").read_text())["server"]["shutdown_grace_seconds"]
    pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > grace + pre_stop

    sc = c["securityContext"]
    assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["securityContext"]["runAsNonRoot"]
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert {"/data", "/tmp"} <= mounts  # the only writable paths with a read-only root

    res = c["resources"]
    for part in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(res[part])
    mib = {"Mi": 1, "Gi": 1024}
    mem = {k: int(v["memory"][:-2]) * mib[v["memory"][-2:]] for k, v in res.items()}
    assert mem["requests"] >= 305  # README: 305 MB peak RSS with the embedding model
    assert mem["limits"] >= 464  # README: 464 MB with SmolLM2 open too
    cpu = {k: float(v["cpu"]) for k, v in c["resources"].items()}
    assert cpu["limits"] >= 1.4 > cpu["requests"] >= 0.5  # measured: 1.4 cores at full load

    env = {e["name"]: e for e in c["env"]}
    key_file = env["APPLIANCE_AUTH__ADMIN_KEY_FILE"]["value"]
    secret_mounts = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    (mount,) = [m for m in c["volumeMounts"] if key_file.startswith(m["mountPath"] + "/")]
    assert secret_mounts[mount["name"]] == "appliance-admin-key"

    labels = dep["spec"]["selector"]["matchLabels"]
    (spread,) = pod["topologySpreadConstraints"]
    assert spread["topologyKey"] == "kubernetes.io/hostname"
    assert spread["labelSelector"]["matchLabels"] == labels

    (pdb,) = objects(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == labels

    (policy,) = objects(docs, "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"] == labels
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    egress = policy["spec"]["egress"]
    assert all(rule.get("to") for rule in egress)  # every way out names where it goes
    egress_ports = {p["port"] for rule in egress for p in rule["ports"]}
    clustered = overlay != "single"
    assert egress_ports == ({53, 6379, 5432} if clustered else {53})
    if clustered:
        peers = {
            p["port"]: rule["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/name"]
            for rule in egress
            for p in rule["ports"]
            if p["port"] != 53
        }
        assert peers == {6379: "redis", 5432: "postgresql"}
    sources = [s for rule in policy["spec"]["ingress"] for s in rule["from"]]
    # The peers keep their own labels (kustomize's includeSelectors once rewrote them).
    assert {"app.kubernetes.io/name": "prometheus"} in [
        s.get("podSelector", {}).get("matchLabels") for s in sources
    ]
    dns = [p for rule in policy["spec"]["egress"] for p in rule.get("to", [])]
    assert dns[0]["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}
    assert any("ingress" in str(s) for s in sources)


def test_single_overlay(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["single"]
    dep = appliance_deployment(docs)
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"]["type"] == "Recreate"
    (data,) = [v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == "data"]
    claims = {p["metadata"]["name"] for p in objects(docs, "PersistentVolumeClaim")}
    assert set(data) == {"name", "persistentVolumeClaim"}
    assert data["persistentVolumeClaim"]["claimName"] in claims
    assert not objects(docs, "HorizontalPodAutoscaler")


def test_cluster_overlay(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["cluster"]
    dep = appliance_deployment(docs)
    assert dep["spec"]["replicas"] > 1
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in c["env"]}
    for name in ("APPLIANCE_CLUSTER__DATABASE_URL", "APPLIANCE_CLUSTER__REDIS_URL"):
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "appliance-cluster"
    claims = {p["metadata"]["name"]: p for p in objects(docs, "PersistentVolumeClaim")}
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}

    def access(path: str) -> list[str]:
        claim = volumes[mounts[path]]["persistentVolumeClaim"]["claimName"]
        return claims[claim]["spec"]["accessModes"]

    assert access("/models") == ["ReadOnlyMany"]
    assert access(env["APPLIANCE_JOBS__DIR"]["value"]) == ["ReadWriteMany"]
    (pdb,) = objects(docs, "PodDisruptionBudget")
    assert 0 < pdb["spec"]["minAvailable"] < dep["spec"]["replicas"]


def test_hpa_scales_on_a_metric_the_appliance_exports(
    rendered: dict[str, list[dict[str, Any]]], client: Any
) -> None:
    (hpa,) = objects(rendered["cluster"], "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == "appliance"
    by_type = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert by_type["Resource"]["resource"]["name"] == "cpu"
    name = by_type["Pods"]["pods"]["metric"]["name"]
    assert name == "appliance_queue_depth"
    exported = client.get("/metrics").text
    assert f"# TYPE {name} gauge" in exported
    assert any(line.startswith(name + "{") for line in exported.splitlines())


def test_admin_key_file_is_added_hashed_once(tmp_path: Path) -> None:
    from tests.conftest import make_settings

    secret_file = tmp_path / "admin.key"
    secret_file.write_text("ak_from-a-kubernetes-secret\n")
    settings = make_settings(
        tmp_path / "data", tmp_path / "models", APPLIANCE_AUTH__ADMIN_KEY_FILE=str(secret_file)
    )
    keys = KeyStore(settings.keys_path)
    bootstrap_admin_key(settings, keys)
    bootstrap_admin_key(settings, keys)  # a restart with the same Secret adds nothing
    (key,) = keys.list()
    assert key.scopes == ["admin"]
    assert keys.authenticate("ak_from-a-kubernetes-secret") == key
    assert "ak_from-a-kubernetes-secret" not in settings.keys_path.read_text()
    assert not (settings.data_path / "admin.key").exists()
