"""What a preparation Job and its pod say, read from the API's JSON (pure: no client, no I/O).

``functions.backends.knative`` polls the Job and its pod and asks this module three things: is it over (``job_view``),
what is it doing (``stage_of``: the pod's wait, or the last stage ``runtime.prepare`` printed), and, when it failed,
what the tenant should read (``failure_reason``: the ``{"error": ...}`` line of the pod's termination message, an
out-of-memory kill, a crash, the deadline, or the Job's own condition).
"""

from __future__ import annotations

import json
import signal
from dataclasses import dataclass
from typing import Any

Obj = dict[str, Any]

RUNNING, SUCCEEDED, FAILED = "running", "succeeded", "failed"
PREPARING = "preparing in the cluster"


@dataclass(frozen=True)
class JobView:
    outcome: str  # RUNNING, SUCCEEDED or FAILED
    reason: str = ""  # the failure condition's reason: DeadlineExceeded, BackoffLimitExceeded, ...
    message: str = ""


@dataclass(frozen=True)
class PodView:
    name: str
    phase: str  # Pending, Running, Succeeded, Failed, Unknown
    waiting: str = ""  # why it has not started: "Unschedulable: 0/3 nodes ...", "ImagePullBackOff: ..."
    exit_code: int | None = None  # set once the container terminated
    terminated_reason: str = ""  # Completed, Error, OOMKilled, ...
    message: str = ""  # the termination message (FallbackToLogsOnError: the log's tail on a failure)
    stopped: str = ""  # why the kubelet ended the pod itself: "Evicted: ... ephemeral-storage ..."


def job_view(job: Obj) -> JobView:
    """Over or not, from the Job's conditions (FailureTarget comes before Failed on Kubernetes 1.31+)."""
    status = job.get("status") or {}
    for condition in status.get("conditions") or []:
        if condition.get("status") != "True":
            continue
        if condition.get("type") in ("Failed", "FailureTarget"):
            return JobView(FAILED, condition.get("reason") or "", condition.get("message") or "")
        if condition.get("type") in ("Complete", "SuccessCriteriaMet"):
            return JobView(SUCCEEDED)
    if status.get("succeeded"):
        return JobView(SUCCEEDED)
    return JobView(RUNNING)


def pod_view(pods: list[Obj], container: str) -> PodView | None:
    """The newest of the Job's pods (with backoffLimit 0 there is one), as far as CONTAINER goes."""
    if not pods:
        return None
    pod = max(pods, key=lambda p: (p["metadata"].get("creationTimestamp") or "", p["metadata"]["name"]))
    status = pod.get("status") or {}
    name, phase = pod["metadata"]["name"], status.get("phase") or "Pending"
    stopped = _joined(status.get("reason"), status.get("message")) if phase == "Failed" else ""
    waiting = ""
    for condition in status.get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            waiting = _joined(condition.get("reason"), condition.get("message"))
    for state in status.get("containerStatuses") or []:
        if state.get("name") != container:
            continue
        current = state.get("state") or {}
        if "terminated" in current:
            t = current["terminated"]
            exit_code, reason, message = (
                int(t.get("exitCode", 0)),
                t.get("reason") or "",
                t.get("message") or "",
            )
            return PodView(name, phase, "", exit_code, reason, message, stopped)
        if "waiting" in current:
            waiting = _joined(current["waiting"].get("reason"), current["waiting"].get("message"))
    return PodView(name, phase, waiting, stopped=stopped)


def stage_of(pod: PodView | None, printed: str | None) -> str:
    """What to show on the function while it prepares: runtime.prepare's own stage once it printed one."""
    if printed:
        return printed
    if pod is None:
        return f"{PREPARING}: waiting for a pod"
    if pod.phase == "Pending":
        # ContainerCreating (pulling the image, mounting the volume) is the normal wait; anything else is news.
        wait = pod.waiting if pod.waiting and not pod.waiting.startswith("ContainerCreating") else ""
        return f"{PREPARING}: pod pending" + (f" ({wait[:200]})" if wait else "")
    return PREPARING


def last_stage(log: str) -> str | None:
    """The last ``{"stage": ...}`` line runtime.prepare printed."""
    for line in reversed(log.splitlines()):
        parsed = _json_line(line)
        if parsed is not None and len(parsed) == 1 and isinstance(parsed.get("stage"), str):
            return str(parsed["stage"])
    return None


def reported_error(message: str) -> str | None:
    """runtime.prepare's own reason: its last ``{"error": ...}`` line."""
    for line in reversed(message.splitlines()):
        parsed = _json_line(line)
        if parsed is not None and "error" in parsed:
            return str(parsed["error"])
    return None


def failure_reason(job: JobView, pod: PodView | None, *, timeout_s: float, memory: str, device: str) -> str:
    """The true reason of a failed preparation, in the words the embedded platform uses for the same cause."""
    if job.reason == "DeadlineExceeded":
        return timeout_reason(timeout_s, pod)
    if pod is not None and (error := reported_error(pod.message)):
        return error
    if pod is not None and pod.stopped:  # e.g. evicted for filling its /tmp past its size limit
        return f"the cluster stopped the preparation ({pod.stopped[:300]})"
    if pod is not None and pod.exit_code is not None:
        if pod.terminated_reason == "OOMKilled":
            return (
                f"preparing the model ran out of memory: a preparation may use at most {memory} "
                "(optimisation and golden check hold the model several times)"
            )
        tail = [ln.strip() for ln in pod.message.strip().splitlines() if ln.strip()]
        if pod.exit_code > 128:
            return (
                f"Paddle crashed ({_signal_name(pod.exit_code - 128)}) while loading or optimising the model; "
                f"it may use an operator this Paddle {device.upper()} build cannot run. "
                f"Last message: {(tail[-1] if tail else '')[:300]}"
            )
        if pod.exit_code != 0:
            return f"preparing the model failed (status {pod.exit_code}): {' | '.join(tail[-3:])[:500]}"
    return f"the preparation Job failed ({job.reason or 'no reason given'}): {job.message[:300]}".rstrip(": ")


def timeout_reason(timeout_s: float, pod: PodView | None) -> str:
    reason = f"preparing the model took longer than {timeout_s:g} s (optimisation and golden check)"
    if pod is None:
        return reason + "; the cluster started no pod for it (the tenant's quota, or no node that fits)"
    if pod.phase == "Pending":
        return reason + f"; its pod never started ({pod.waiting[:200] or 'pending'})"
    return reason


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _json_line(line: str) -> Obj | None:
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        parsed = json.loads(line)
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None


def _joined(reason: str | None, message: str | None) -> str:
    return ": ".join(part for part in (reason, message) if part)
