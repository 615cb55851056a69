"""The Kustomize bases render with the real kubectl and every object validates strictly; the Prometheus config
and rules pass promtool; the tenant and function templates are exactly what the backend applies."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.schemas import validate

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests"
BASES = sorted(p.parent.relative_to(MANIFESTS).as_posix() for p in MANIFESTS.rglob("kustomization.yaml"))


def kustomize(base: str) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is missing (it renders the Kustomize bases offline: `kubectl kustomize`)")
    out = subprocess.run(
        [kubectl, "kustomize", str(MANIFESTS / base)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def test_there_are_bases_for_the_platform_tenants_and_functions() -> None:
    assert BASES == ["function/deployment", "function/knative", "platform", "tenant"]


@pytest.mark.parametrize("base", BASES)
def test_every_base_renders_and_every_object_validates_strictly(base: str) -> None:
    objects = kustomize(base)
    assert objects
    for obj in objects:
        validate(obj)


def test_the_templates_are_what_the_backend_renders() -> None:
    sys.path.insert(0, str(MANIFESTS))
    try:
        import generate  # manifests/generate.py
    finally:
        sys.path.remove(str(MANIFESTS))
    for path, text in generate.templates().items():
        assert path.read_text() == text, f"{path} is stale: run .venv/bin/python manifests/generate.py"


def test_the_control_plane_may_touch_only_the_kinds_it_renders() -> None:
    objects = kustomize("platform")
    [role] = [o for o in objects if o["kind"] == "ClusterRole"]
    read_only = {"pods": {"list"}, "pods/log": {"get"}}  # a preparation Job's pod: its status and its log
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
        assert not {"secrets", "pods/exec", "pods/attach", "roles", "rolebindings"} & set(rule["resources"])
        for resource in rule["resources"]:
            assert set(rule["verbs"]) <= read_only.get(resource, {"get", "create", "patch", "delete"}), (
                resource
            )
    granted = {(group, r): set(rule["verbs"]) for rule in role["rules"] for group in rule["apiGroups"]
               for r in rule["resources"]}  # fmt: skip
    # Deploy preparation: a Job in the tenant's namespace, created, read, deleted by the control plane.
    assert granted[("batch", "jobs")] == {"get", "create", "patch", "delete"}
    assert granted[("", "pods")] == {"list"} and granted[("", "pods/log")] == {"get"}
    scaler = next(
        o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "paddlefn-scaler"
    )
    assert scaler["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


def test_prometheus_config_and_recording_rules_pass_promtool(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is missing: it comes with the Debian package `prometheus`")
    [config_map] = [o for o in kustomize("platform") if o["kind"] == "ConfigMap"]
    rules = tmp_path / "rules.yml"
    rules.write_text(config_map["data"]["rules.yml"])
    (tmp_path / "key").write_text("secret")
    config = yaml.safe_load(config_map["data"]["prometheus.yml"])
    config["rule_files"] = [str(rules)]
    job = config["scrape_configs"][0]
    job["authorization"]["credentials_file"] = str(tmp_path / "key")
    # Debian builds Prometheus without Kubernetes service discovery; the image in the manifest has it.
    assert job.pop("kubernetes_sd_configs")[0]["role"] == "pod"
    job["static_configs"] = [{"targets": ["127.0.0.1:8080"]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    for command in (["check", "rules", str(rules)], ["check", "config", str(tmp_path / "prometheus.yml")]):
        out = subprocess.run([promtool, *command], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
