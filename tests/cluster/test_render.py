"""Every object the knative backend renders validates strictly against the real schemas (offline)."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from functions.cluster.config import ClusterConfig, TenantQuota
from functions.cluster.render import (
    FALLBACK,
    PRIMARY,
    FunctionSpec,
    PrepareSpec,
    function_objects,
    prepare_job,
    service_name,
    tenant_objects,
)
from tests.cluster.schemas import validate

KNATIVE = ClusterConfig()
DEPLOYMENT = ClusterConfig(mode="deployment", storage_class="nfs-client")
FUNCTIONS = [
    FunctionSpec("acme", "classify", "v3", lite=True, max_batch_size=32, min_scale=1, max_scale=8),
    FunctionSpec("acme", "tiny", "v1", idle_timeout_s=60, request_timeout_s=3600, cold_start_timeout_s=2),
    FunctionSpec("t" * 63, "f" * 63, "v1", lite=True),  # longest names the platform allows
    FunctionSpec("acme", "on-cpu", "v1", gpu=False),
]
PREPARES = [
    PrepareSpec("acme", "classify", "0123456789ab", device="gpu", batching=True),
    PrepareSpec("acme", "tiny", "v1", device="cpu", deadline_s=0.5),
    PrepareSpec("t" * 63, "f" * 63, "0123456789ab"),  # longest names the platform allows
]


def all_objects() -> list[tuple[str, dict[str, Any]]]:
    objects = []
    for config in (KNATIVE, DEPLOYMENT, ClusterConfig(lite_fallback=False)):
        for tenant in ("acme", "t" * 63):
            objects += tenant_objects(tenant, config, TenantQuota(gpus=2))
        for fn in FUNCTIONS:
            objects += function_objects(fn, config)
        objects += [prepare_job(p, config) for p in PREPARES]
    objects.append(
        prepare_job(PREPARES[0], ClusterConfig(prepare_image="example/prep:1", prepare_cpu="500m"))
    )
    return [(f"{o['kind']}/{o['metadata']['name'][:20]}-{i}", o) for i, o in enumerate(objects)]


@pytest.mark.parametrize("obj", [o for _, o in all_objects()], ids=[i for i, _ in all_objects()])
def test_every_rendered_object_validates_strictly(obj: dict[str, Any]) -> None:
    validate(obj)


def override_of(service: dict[str, Any]) -> dict[str, Any]:
    annotations = service["spec"]["template"]["metadata"]["annotations"]
    return json.loads(annotations["autoscaling.knative.dev/scaled-object-override"])


def test_the_scaled_object_override_validates_once_the_extension_completes_it() -> None:
    # autoscaler-keda sets name, namespace and scaleTargetRef from the revision (setScaledObjectDefaults).
    for fn in FUNCTIONS:
        for service in function_objects(fn, KNATIVE):
            override = override_of(service)
            override["metadata"] = {"name": f"{service['metadata']['name']}-00001", "namespace": "t-acme"}
            override["spec"]["scaleTargetRef"] = {"name": f"{service['metadata']['name']}-00001-deployment"}
            validate(override)


def test_strict_validation_rejects_unknown_fields() -> None:
    # The API server would silently drop these; strict validation must not.
    service, *_ = function_objects(FUNCTIONS[0], KNATIVE)
    typo = copy.deepcopy(service)
    typo["spec"]["template"]["spec"]["containerConcurency"] = 4
    with pytest.raises(Exception, match="containerConcurency"):
        validate(typo)
    scaled = function_objects(FUNCTIONS[0], DEPLOYMENT)[2]
    typo = copy.deepcopy(scaled)
    typo["spec"]["minReplicas"] = 0
    with pytest.raises(Exception, match="minReplicas"):
        validate(typo)
    quota = copy.deepcopy(tenant_objects("acme", KNATIVE)[1])
    quota["spec"]["hardd"] = {}
    with pytest.raises(Exception, match="hardd"):
        validate(quota)


def test_a_knative_function_is_driven_by_keda_through_our_scaler() -> None:
    gpu, lite = function_objects(FUNCTIONS[0], KNATIVE)
    template = gpu["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    assert annotations["autoscaling.knative.dev/class"] == "hpa.autoscaling.knative.dev"
    spec = override_of(gpu)["spec"]
    assert spec["cooldownPeriod"] == 900  # the idle timeout
    assert spec["minReplicaCount"] == 1 and spec["maxReplicaCount"] == 8
    trigger = spec["triggers"][0]
    assert trigger["type"] == "external-push"
    assert trigger["metadata"]["scalerAddress"] == KNATIVE.scaler_address
    assert (trigger["metadata"]["tenant"], trigger["metadata"]["function"]) == ("acme", "classify")
    container = template["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert template["spec"]["containerConcurrency"] == FUNCTIONS[0].container_concurrency
    assert "--max-batch-size" in container["args"]
    assert lite["metadata"]["name"] == "classify-lite"
    lite_container = lite["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in lite_container["resources"]["limits"]
    assert lite_container["image"] == KNATIVE.lite_image and "lite" in lite_container["args"]
    assert override_of(lite)["spec"]["maxReplicaCount"] == 1


def test_a_cpu_function_runs_the_shared_image_without_a_gpu() -> None:
    container = function_objects(FUNCTIONS[3], KNATIVE)[0]["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == KNATIVE.gpu_image
    assert "nvidia.com/gpu" not in container["resources"]["requests"]
    assert container["args"][container["args"].index("--device") + 1] == "cpu"


def test_the_trigger_can_be_the_polling_external_scaler() -> None:
    scaled = function_objects(FUNCTIONS[0], ClusterConfig(mode="deployment", trigger_type="external"))[2]
    assert scaled["spec"]["triggers"][0]["type"] == "external"
    validate(scaled)
    with pytest.raises(ValueError, match="TRIGGER_TYPE"):
        ClusterConfig.from_env({"PADDLEFN_K8S_TRIGGER_TYPE": "push"})


def test_request_timeouts_stay_within_knatives_limit() -> None:
    service = function_objects(FUNCTIONS[1], KNATIVE)[0]
    assert service["spec"]["template"]["spec"]["timeoutSeconds"] == 600


def test_without_knative_a_function_is_a_deployment_a_service_and_an_external_scaled_object() -> None:
    kinds = [(o["kind"], o["metadata"]["name"]) for o in function_objects(FUNCTIONS[0], DEPLOYMENT)]
    kinds_of_each = ("Deployment", "Service", "ScaledObject")
    expected = [(kind, name) for name in ("classify", "classify-lite") for kind in kinds_of_each]
    assert kinds == expected
    deployment, _, scaled = function_objects(FUNCTIONS[0], DEPLOYMENT)[:3]
    assert "replicas" not in deployment["spec"]  # KEDA owns it
    assert scaled["spec"]["scaleTargetRef"]["name"] == "classify"
    assert deployment["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


def test_a_tenant_gets_a_fenced_namespace_with_a_gpu_quota() -> None:
    objects = {o["kind"]: o for o in tenant_objects("acme", KNATIVE, TenantQuota(gpus=3))[::-1]}  # first wins
    assert objects["Namespace"]["metadata"]["name"] == "t-acme"
    assert objects["ResourceQuota"]["spec"]["hard"]["requests.nvidia.com/gpu"] == "3"
    assert objects["ServiceAccount"]["automountServiceAccountToken"] is False
    assert objects["NetworkPolicy"]["metadata"]["name"] == "paddlefn-isolation"
    sources = objects["NetworkPolicy"]["spec"]["ingress"][0]["from"]
    allowed = {s["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] for s in sources[1:]}
    assert allowed == {"paddlefn-system", "knative-serving", "kourier-system"}
    assert sources[0] == {"podSelector": {}}  # the namespace itself; no other tenant's namespace
    assert objects["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]


def test_long_names_stay_valid_and_distinct() -> None:
    long_a, long_b = FunctionSpec("a", "f" * 60 + "abc", "v1"), FunctionSpec("a", "f" * 60 + "abd", "v1")
    names = {service_name(long_a, PRIMARY), service_name(long_b, PRIMARY), service_name(long_a, FALLBACK)}
    assert len(names) == 3 and all(len(n) <= 46 for n in names)


def test_a_tenants_quota_follows_its_plan() -> None:
    from functions.cluster.config import quota_from_limits
    from functions.plans import Limits

    quota = quota_from_limits(Limits(max_replicas=3, max_storage_bytes=5 * 2**30 + 1))
    assert (quota.gpus, quota.pods, quota.storage) == (3, 6, "6Gi")
    assert quota_from_limits(Limits(gpu_allowed=False)).gpus == 0
    [_, resource_quota, *_] = tenant_objects("acme", KNATIVE, quota)
    assert resource_quota["spec"]["hard"]["requests.nvidia.com/gpu"] == "3"
    validate(resource_quota)


def test_the_prepare_job_runs_as_the_tenant_with_only_this_versions_folders_mounted() -> None:
    job = prepare_job(
        PrepareSpec("acme", "classify", "v3", device="gpu", batching=True, deadline_s=120), KNATIVE
    )
    assert (job["metadata"]["namespace"], job["metadata"]["name"]) == ("t-acme", "prepare-classify-v3")
    spec = job["spec"]
    assert (spec["activeDeadlineSeconds"], spec["backoffLimit"], spec["ttlSecondsAfterFinished"]) == (
        120,
        0,
        600,
    )
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == "paddlefn-function" and pod["automountServiceAccountToken"] is False
    [container] = pod["containers"]
    assert container["image"] == KNATIVE.gpu_image and container["command"] == ["python"]
    assert container["args"][:2] == ["-m", "runtime.prepare"] and container["args"][-3:] == [
        "--device", "gpu", "--batching"
    ]  # fmt: skip
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert container["resources"]["limits"] == {"cpu": "2", "memory": "8Gi", "nvidia.com/gpu": "1"}
    assert container["resources"]["requests"] == container["resources"]["limits"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    model, serving = "/models/functions/classify/v3/model", "/models/functions/classify/v3/serving"
    assert mounts[model] == {"name": "models", "mountPath": model, "subPath": "functions/classify/v3/model",
                             "readOnly": True}  # fmt: skip
    assert mounts[serving]["subPath"] == "functions/classify/v3/serving" and "readOnly" not in mounts[serving]
    assert set(mounts) == {model, serving, "/tmp"}
    assert {v["name"]: v for v in pod["volumes"]}["models"]["persistentVolumeClaim"] == {
        "claimName": "models"
    }
    # Where the served model is read from: the folder the Job writes.
    [function] = function_objects(FunctionSpec("acme", "classify", "v3"), ClusterConfig(lite_fallback=False))
    args = function["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--model-dir") + 1] == serving


def test_a_cpu_prepare_holds_no_gpu_and_paddle_uses_the_cores_it_may() -> None:
    config = ClusterConfig(prepare_cpu="1500m", prepare_memory="2Gi", prepare_image="example/prepare:1")
    [container] = prepare_job(PrepareSpec("acme", "f", "v1", device="auto"), config)["spec"]["template"][
        "spec"
    ]["containers"]
    assert container["image"] == "example/prepare:1"
    assert container["resources"]["limits"] == {"cpu": "1500m", "memory": "2Gi"}
    assert {e["name"]: e["value"] for e in container["env"]}["OMP_NUM_THREADS"] == "2"


def test_prepare_pods_are_under_the_tenant_policies_and_get_no_traffic_at_all() -> None:
    job = prepare_job(PrepareSpec("acme", "classify", "v3"), KNATIVE)
    labels = job["spec"]["template"]["metadata"]["labels"]
    policies = {
        o["metadata"]["name"]: o for o in tenant_objects("acme", KNATIVE) if o["kind"] == "NetworkPolicy"
    }
    assert policies["paddlefn-isolation"]["spec"]["podSelector"] == {}  # every pod of the namespace
    prepare = policies["paddlefn-prepare"]["spec"]
    assert prepare["podSelector"]["matchLabels"].items() <= labels.items()
    assert prepare["policyTypes"] == ["Ingress", "Egress"]
    assert "ingress" not in prepare and "egress" not in prepare  # nothing allowed either way


def test_prepare_settings_come_from_the_environment_with_their_types() -> None:
    env = {
        "PADDLEFN_K8S_PREPARE_POLL_S": "0.5",
        "PADDLEFN_K8S_PREPARE_TTL_S": "60",
        "PADDLEFN_K8S_PREPARE_CPU": "4",
    }
    config = ClusterConfig.from_env(env)
    assert (config.prepare_poll_s, config.prepare_ttl_s, config.prepare_cpu) == (0.5, 60, "4")
    assert prepare_job(PrepareSpec("acme", "f", "v1"), config)["spec"]["ttlSecondsAfterFinished"] == 60
