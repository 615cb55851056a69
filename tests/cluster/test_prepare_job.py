"""Deploy preparation on Kubernetes: a Job in the tenant's namespace, never the control plane's pod.

The knative backend drives the stand-in API server (``tests/cluster/apiserver.py``) through the official client;
the test plays the Job controller and the kubelet (``Kubelet``): it waits for the Job, checks it, makes its pod
and reports what a cluster would. Where it says so, it runs the Job's own command (``python -m runtime.prepare``)
on a real example model, with the Job's volume mounts mapped onto the tenant's folder here.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from functions.backends.knative import KnativeBackend
from functions.cluster import job_status
from functions.cluster.config import ClusterConfig
from functions.cluster.render import JOB_NAME_LABEL
from functions.deploy import DeployFailed
from functions.registry import FunctionConfig, FunctionRecord
from functions.settings import Settings
from runtime.spec import Manifest, ModelSpec
from tests.cluster.apiserver import StandInApiServer
from tests.cluster.conftest import wait_until

ROOT = Path(__file__).resolve().parents[2]
VERSION = "0123456789ab"
JOB = ("batch/v1", "Job", "t-acme", f"prepare-classify-{VERSION}")
FAILED_BY_BACKOFF = {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                     "message": "Job has reached the specified backoff limit"}  # fmt: skip


@pytest.fixture
def apiserver() -> Iterator[StandInApiServer]:
    server = StandInApiServer().start()
    yield server
    server.stop()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


def uploaded(data_dir: Path, model: Path | None = None, **config: Any) -> FunctionRecord:
    """A function record as the platform makes it on upload: data_dir/tenants/acme/functions/classify/VERSION."""
    artifact_dir = data_dir / "tenants" / "acme" / "functions" / "classify" / VERSION
    if model is not None:
        shutil.copytree(model, artifact_dir / "model")
    else:
        (artifact_dir / "model").mkdir(parents=True)
    now = datetime.now(UTC)
    return FunctionRecord(
        1,
        "acme",
        "classify",
        "deploying",
        FunctionConfig(**config),
        VERSION,
        artifact_dir,
        None,
        None,
        now,
        now,
    )


def backend_for(
    apiserver: StandInApiServer, data_dir: Path, deploy_timeout_s: float = 60.0
) -> KnativeBackend:
    def api_client() -> client.ApiClient:
        return client.ApiClient(client.Configuration(host=apiserver.url))

    settings = Settings(data_dir=data_dir, deploy_timeout_s=deploy_timeout_s)
    config = ClusterConfig(prepare_poll_s=0.05, prepare_grace_s=0.5)
    return KnativeBackend(settings, config, api_client_factory=api_client)


class Kubelet:
    """Plays the Job controller and the kubelet: ACT(kubelet, job) runs in a thread once the Job exists."""

    def __init__(
        self, apiserver: StandInApiServer, volume: Path, act: Callable[[Kubelet, dict[str, Any]], None]
    ):
        self.apiserver, self.volume, self.act = apiserver, volume, act  # volume: the tenant's `models` claim
        self.job: dict[str, Any] = {}
        self.pod_name = ""
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="kubelet")

    def __enter__(self) -> Kubelet:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.thread.join(30)
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        try:
            wait_until(lambda: JOB in self.apiserver.objects, 10, "the preparation Job")
            self.job = self.apiserver.get(*JOB)
            self.act(self, self.job)
        except BaseException as exc:  # shown by __exit__, in the test's thread
            self.error = exc

    # --- what a cluster reports ------------------------------------------------------------------------------

    def start_pod(self, phase: str = "Pending", **status: Any) -> None:
        template = self.job["spec"]["template"]
        self.pod_name = f"{self.job['metadata']['name']}-x7k2p"
        labels = {**template["metadata"]["labels"], JOB_NAME_LABEL: self.job["metadata"]["name"]}
        self.apiserver.put({
            "apiVersion": "v1", "kind": "Pod", "spec": template["spec"],
            "metadata": {"name": self.pod_name, "namespace": "t-acme", "labels": labels,
                         "creationTimestamp": "2026-12-01T10:00:00Z"},
            "status": {"phase": phase, **status},
        })  # fmt: skip

    def pod_status(self, phase: str, **status: Any) -> None:
        self.apiserver.set_status("v1", "Pod", "t-acme", self.pod_name, {"phase": phase, **status})

    def terminate(self, exit_code: int, message: str = "", reason: str = "") -> None:
        terminated = {"exitCode": exit_code, "reason": reason or ("Completed" if exit_code == 0 else "Error"),
                      "message": message}  # fmt: skip
        state = {"name": "prepare", "ready": False, "restartCount": 0, "image": "x", "imageID": "",
                 "state": {"terminated": terminated}}  # fmt: skip
        self.pod_status("Succeeded" if exit_code == 0 else "Failed", containerStatuses=[state])

    def job_status(self, condition: dict[str, Any], **counts: int) -> None:
        self.apiserver.set_status(*JOB, {"conditions": [condition], **counts})

    def run_container(self) -> int:
        """Run the Job's container here, as a kubelet would: its command, its env, its mounts, its output."""
        [container] = self.job["spec"]["template"]["spec"]["containers"]
        mounts = {
            m["mountPath"]: self.volume / m["subPath"] for m in container["volumeMounts"] if "subPath" in m
        }
        for (
            mount_path,
            local,
        ) in mounts.items():  # a subPath the platform did not create would be the kubelet's
            assert local.is_dir(), f"{mount_path}: {local} does not exist on the tenant's volume"
        args = [mounts.get(a, a) for a in container["args"]]
        env = {e["name"]: e["value"] for e in container["env"]}
        env |= {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), "HOME": str(self.volume.parent / "home")}
        self.start_pod("Running")
        assert container["command"] == ["python"]
        output = ""
        with subprocess.Popen(
            [sys.executable, *map(str, args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
        ) as process:
            assert process.stdout is not None
            for line in process.stdout:
                output += line
                self.apiserver.logs[("t-acme", self.pod_name)] = output
        code = process.returncode
        # FallbackToLogsOnError: on a failure, the log's last 80 lines (at most 2048 bytes) become the message.
        message = "" if code == 0 else "".join(output.splitlines(keepends=True)[-80:])[-2048:]
        self.terminate(code, message)
        return code


def prepare(
    backend: KnativeBackend, fn: FunctionRecord, stages: list[str] | None = None, **kw: Any
) -> Manifest:
    async def scenario() -> Manifest:
        await backend.start()
        try:
            return await backend.prepare(
                fn, device=kw.get("device", "cpu"), batching=kw.get("batching", False),
                on_stage=(stages if stages is not None else []).append,
            )  # fmt: skip
        finally:
            await backend.close()

    return asyncio.run(scenario())


# --- the real thing: runtime.prepare in the Job's container, on a real model -----------------------------


def test_a_deploy_is_prepared_by_a_job_in_the_tenant_namespace_and_returns_its_manifest(
    apiserver: StandInApiServer, data_dir: Path, models: dict[str, Path]
) -> None:
    fn = uploaded(data_dir, models["mlp"])

    def act(kubelet: Kubelet, job: dict[str, Any]) -> None:
        assert kubelet.run_container() == 0
        kubelet.job_status({"type": "Complete", "status": "True"}, succeeded=1)

    stages: list[str] = []
    with Kubelet(apiserver, data_dir / "tenants" / "acme", act) as kubelet:
        manifest = prepare(backend_for(apiserver, data_dir, deploy_timeout_s=300), fn, stages, batching=True)

    assert manifest == Manifest.load(fn.serving_dir) and manifest.spec.batchable
    assert (fn.serving_dir / manifest.program).is_file()
    # Where and as whom it ran (the stand-in already validated the Job strictly against batch/v1).
    job = kubelet.job
    pod = job["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert job["metadata"]["namespace"] == "t-acme"
    assert pod["serviceAccountName"] == "paddlefn-function" and pod["automountServiceAccountToken"] is False
    assert pod["restartPolicy"] == "Never" and pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False, "runAsNonRoot": True, "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"},
    }  # fmt: skip
    assert job["spec"]["activeDeadlineSeconds"] == 300 and job["spec"]["backoffLimit"] == 0
    assert job["spec"]["ttlSecondsAfterFinished"] > 0
    folder = f"/models/functions/classify/{VERSION}"
    assert container["args"] == [
        "-m", "runtime.prepare", f"{folder}/model", f"{folder}/serving", "--device", "cpu", "--batching"
    ]  # fmt: skip
    # No platform secret: plain values only, nothing from Secrets, none of the platform's own variables.
    assert "envFrom" not in container and all(set(e) == {"name", "value"} for e in container["env"])
    assert not [e for e in container["env"] if e["name"] in ("PADDLEFN_DATABASE_URL", "PADDLEFN_ADMIN_KEY")]
    assert container["resources"]["limits"]["memory"] and container["resources"]["requests"]["cpu"]
    # Its stages: the cluster's, then runtime.prepare's own (as the embedded platform shows them).
    assert stages[0] == job_status.PREPARING and "loading" in stages
    # Done: the Job is deleted, its pod with it (Background: batch/v1 would orphan it otherwise).
    assert (JOB, "Background") in apiserver.deletions
    assert apiserver.find("batch/v1", "Job", "t-acme") == [] and apiserver.find("v1", "Pod", "t-acme") == []


def test_a_model_that_fails_preparation_gives_the_reason_runtime_prepare_printed(
    apiserver: StandInApiServer, data_dir: Path, models: dict[str, Path], tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(models["mlp"], broken)
    (broken / "model.pdmodel").write_bytes(b"this is not a Paddle program")
    fn = uploaded(data_dir, broken)

    def act(kubelet: Kubelet, job: dict[str, Any]) -> None:
        assert kubelet.run_container() == 2
        kubelet.job_status(FAILED_BY_BACKOFF, failed=1)

    with Kubelet(apiserver, data_dir / "tenants" / "acme", act), pytest.raises(DeployFailed) as failed:
        prepare(backend_for(apiserver, data_dir), fn)
    assert str(failed.value).startswith("model.pdmodel is not a Paddle program")
    assert (JOB, "Background") in apiserver.deletions


# --- failures as the cluster reports them --------------------------------------------------------------------


def test_a_preparation_killed_for_memory_says_so_with_its_limit(
    apiserver: StandInApiServer, data_dir: Path
) -> None:
    def act(kubelet: Kubelet, job: dict[str, Any]) -> None:
        kubelet.start_pod("Running")
        kubelet.terminate(137, "", reason="OOMKilled")
        kubelet.job_status(FAILED_BY_BACKOFF, failed=1)

    memory = pytest.raises(DeployFailed, match=r"ran out of memory: a preparation may use at most 8Gi")
    with Kubelet(apiserver, data_dir / "tenants" / "acme", act), memory:
        prepare(backend_for(apiserver, data_dir), uploaded(data_dir))


def test_a_job_past_its_deadline_reports_the_deploy_timeout_and_why_its_pod_never_ran(
    apiserver: StandInApiServer, data_dir: Path
) -> None:
    def act(kubelet: Kubelet, job: dict[str, Any]) -> None:
        assert job["spec"]["activeDeadlineSeconds"] == 2
        waiting = {
            "reason": "ImagePullBackOff",
            "message": 'Back-off pulling image "ghcr.io/paddlefn/runtime-gpu"',
        }
        kubelet.start_pod(containerStatuses=[{"name": "prepare", "ready": False, "restartCount": 0, "image": "x",
                                              "imageID": "", "state": {"waiting": waiting}}])  # fmt: skip
        kubelet.job_status({"type": "Failed", "status": "True", "reason": "DeadlineExceeded",
                            "message": "Job was active longer than specified deadline"})  # fmt: skip

    stages: list[str] = []
    with Kubelet(apiserver, data_dir / "tenants" / "acme", act), pytest.raises(DeployFailed) as failed:
        prepare(backend_for(apiserver, data_dir, deploy_timeout_s=2), uploaded(data_dir), stages)
    assert str(failed.value) == (
        "preparing the model took longer than 2 s (optimisation and golden check); its pod never started "
        '(ImagePullBackOff: Back-off pulling image "ghcr.io/paddlefn/runtime-gpu")'
    )
    assert (JOB, "Background") in apiserver.deletions


def test_a_job_kubernetes_never_ends_is_given_up_after_the_deploy_timeout(
    apiserver: StandInApiServer, data_dir: Path
) -> None:
    # No pod ever (the tenant's quota is used up, say), and no controller marking the deadline.
    timeout = pytest.raises(DeployFailed, match=r"longer than 0\.5 s .*; the cluster started no pod for it")
    with Kubelet(apiserver, data_dir / "tenants" / "acme", lambda kubelet, job: None), timeout:
        prepare(backend_for(apiserver, data_dir, deploy_timeout_s=0.5), uploaded(data_dir))
    assert apiserver.find("batch/v1", "Job", "t-acme") == []


def test_a_cancelled_prepare_deletes_its_job_and_its_pod(apiserver: StandInApiServer, data_dir: Path) -> None:
    backend = backend_for(apiserver, data_dir)
    stages: list[str] = []

    async def scenario() -> None:
        await backend.start()
        try:
            task = asyncio.ensure_future(
                backend.prepare(uploaded(data_dir), device="gpu", batching=False, on_stage=stages.append)
            )
            await asyncio.to_thread(wait_until, lambda: kubelet.pod_name != "", 10, "the Job's pod")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        finally:
            await backend.close()

    def act(kubelet: Kubelet, job: dict[str, Any]) -> None:
        assert (
            job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
        )
        kubelet.start_pod("Running")

    kubelet = Kubelet(apiserver, data_dir / "tenants" / "acme", act)
    with kubelet:
        asyncio.run(scenario())
    assert (JOB, "Background") in apiserver.deletions
    assert apiserver.find("batch/v1", "Job", "t-acme") == [] and apiserver.find("v1", "Pod", "t-acme") == []


def test_removing_a_function_while_it_prepares_deletes_its_job_and_ends_the_wait(
    apiserver: StandInApiServer, data_dir: Path
) -> None:
    fn = uploaded(data_dir)
    backend = backend_for(apiserver, data_dir)

    def act(kubelet: Kubelet, job: dict[str, Any]) -> None:
        kubelet.start_pod("Running")
        asyncio.run(backend.removed(fn))  # as the platform's delete_function, from another thread here

    gone = pytest.raises(
        DeployFailed, match=r"the preparation Job t-acme/prepare-classify-\w+ was deleted before"
    )
    with Kubelet(apiserver, data_dir / "tenants" / "acme", act), gone:
        prepare(backend, fn)
    assert (JOB, "Background") in apiserver.deletions and apiserver.find("v1", "Pod", "t-acme") == []


def test_a_passing_api_server_error_does_not_fail_the_deploy(
    apiserver: StandInApiServer, data_dir: Path
) -> None:
    fn = uploaded(data_dir)

    def act(kubelet: Kubelet, job: dict[str, Any]) -> None:
        apiserver.fail_next = [503, 503]  # two polls answered 503
        wait_until(lambda: not apiserver.fail_next, 5, "the failed polls")
        Manifest("legacy", "model.pdmodel", "model.pdiparams", False, "cpu", ModelSpec((), ()), "3.3.1").save(
            fn.serving_dir
        )
        kubelet.job_status({"type": "Complete", "status": "True"}, succeeded=1)

    with Kubelet(apiserver, data_dir / "tenants" / "acme", act):
        manifest = prepare(backend_for(apiserver, data_dir), fn)
    assert manifest.program == "model.pdmodel"


# --- the reasons, table-driven -------------------------------------------------------------------------------


def pod(exit_code: int, message: str = "", reason: str = "") -> dict[str, Any]:
    terminated = {"exitCode": exit_code, "reason": reason, "message": message}
    containers = [{"name": "prepare", "state": {"terminated": terminated}}]
    return {"metadata": {"name": "p"}, "status": {"phase": "Failed", "containerStatuses": containers}}


def evicted(message: str) -> dict[str, Any]:
    return {"metadata": {"name": "p"}, "status": {"phase": "Failed", "reason": "Evicted", "message": message}}


@pytest.mark.parametrize(
    ("the_pod", "expected"),
    [
        (pod(2, '{"stage": "golden check"}\n{"error": "output y differs by 0.5"}\n'), "output y differs by 0.5"),
        (pod(139, "Segmentation fault (core dumped)\n"), "Paddle crashed (SIGSEGV) while loading or optimising"),
        (pod(1, "a\nb\nTraceback\nImportError: no paddle\n"), "preparing the model failed (status 1): b | Tr"),
        (pod(137, reason="OOMKilled"), "preparing the model ran out of memory: a preparation may use at most 4Gi"),
        (evicted("Pod ephemeral local storage usage exceeds the total limit of containers 4Gi"),
         "the cluster stopped the preparation (Evicted: Pod ephemeral local storage usage exceeds"),
        (None, "the preparation Job failed (BackoffLimitExceeded): Job has reached the specified backoff limit"),
    ],
)  # fmt: skip
def test_a_failed_job_gives_the_true_reason(the_pod: dict[str, Any] | None, expected: str) -> None:
    view = job_status.job_view({"status": {"conditions": [FAILED_BY_BACKOFF]}})
    seen = job_status.pod_view([the_pod] if the_pod else [], "prepare")
    reason = job_status.failure_reason(view, seen, timeout_s=600, memory="4Gi", device="gpu")
    assert reason.startswith(expected), reason


def test_stages_come_from_the_pod_until_runtime_prepare_prints_its_own() -> None:
    no_gpu = "0/3 nodes are available: insufficient nvidia.com/gpu"
    unschedulable = {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
                                                         "reason": "Unschedulable", "message": no_gpu}]}  # fmt: skip
    pending = job_status.pod_view([{"metadata": {"name": "p"}, "status": unschedulable}], "prepare")
    assert job_status.stage_of(None, None) == "preparing in the cluster: waiting for a pod"
    assert job_status.stage_of(pending, None) == (
        "preparing in the cluster: pod pending (Unschedulable: 0/3 nodes are available: insufficient nvidia.com/gpu)"
    )
    log = 'W1201 warning\n{"stage": "loading"}\n{"stage": "optimising"}\nI1201 noise\n'
    assert job_status.stage_of(pending, job_status.last_stage(log)) == "optimising"
    assert job_status.job_view(
        {"status": {"conditions": [{"type": "Complete", "status": "True"}]}}
    ).outcome == (job_status.SUCCEEDED)
    assert job_status.job_view({"status": {"active": 1}}).outcome == job_status.RUNNING
