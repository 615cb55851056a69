"""A STAND-IN for the Kubernetes API server, for tests only: a real HTTP server in a thread that serves just
the REST paths and verbs the knative backend uses (server-side apply PATCH, DELETE, GET of one object, GET of
a namespace's pods by label, GET of a pod's log), and validates every applied body strictly with the same
schemas as the render tests (``tests/cluster/schemas.py``).

It is not Kubernetes: no admission, no defaulting, no controllers, no watch. It does check what the real
server checks at this level: the apply content type and field manager, that the body's kind, name and
namespace match the path, that a namespaced object's namespace exists, and 404 on deleting what is absent.
A test plays the controllers and the kubelet through ``put``, ``set_status`` and ``logs`` (a Job's pods, their
status and output); deleting a Job takes its pods along only with propagationPolicy Background or Foreground,
as on a real cluster, where batch/v1 orphans them by default.
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.cluster.schemas import validate

# path prefix -> (apiVersion, {plural: kind}); Namespace is the one cluster-scoped kind.
GROUPS = {
    "/api/v1": ("v1", {"namespaces": "Namespace", "resourcequotas": "ResourceQuota", "limitranges": "LimitRange",
                       "serviceaccounts": "ServiceAccount", "persistentvolumeclaims": "PersistentVolumeClaim",
                       "services": "Service", "pods": "Pod"}),
    "/apis/networking.k8s.io/v1": ("networking.k8s.io/v1", {"networkpolicies": "NetworkPolicy"}),
    "/apis/apps/v1": ("apps/v1", {"deployments": "Deployment"}),
    "/apis/batch/v1": ("batch/v1", {"jobs": "Job"}),
    "/apis/serving.knative.dev/v1": ("serving.knative.dev/v1", {"services": "Service"}),
    "/apis/keda.sh/v1alpha1": ("keda.sh/v1alpha1", {"scaledobjects": "ScaledObject"}),
}  # fmt: skip
PATH = re.compile(
    r"^(?P<prefix>/apis?(?:/[^/]+)?/v[^/]+)(?:/namespaces/(?P<ns>[^/]+))?/(?P<plural>[^/]+)/(?P<name>[^/]+)$"
)
NAMESPACE_PATH = re.compile(r"^/api/v1/namespaces/(?P<name>[^/]+)$")
PODS_PATH = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/pods$")
LOG_PATH = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/pods/(?P<name>[^/]+)/log$")
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"  # what the Job controller labels a Job's pods with
APPLY = "application/apply-patch+yaml"
# DELETE answers the deleted object for these (core Services, custom resources), a Status for the rest.
RETURN_DELETED = {
    ("v1", "Service"),
    ("serving.knative.dev/v1", "Service"),
    ("keda.sh/v1alpha1", "ScaledObject"),
}

Key = tuple[str, str, str, str]  # apiVersion, kind, namespace ("" when cluster-scoped), name


@dataclass
class StandInApiServer:
    objects: dict[Key, dict[str, Any]] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)  # (verb, path) in order
    fail_next: list[int] = field(default_factory=list)  # statuses to answer the next requests with
    logs: dict[tuple[str, str], str] = field(default_factory=dict)  # (namespace, pod) -> its output so far
    deletions: list[tuple[Key, str | None]] = field(default_factory=list)  # (object, propagationPolicy)
    server: ThreadingHTTPServer | None = None
    thread: threading.Thread | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_port}"

    def start(self) -> StandInApiServer:
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_PATCH(self) -> None:
                stand_in.handle(self, "PATCH")

            def do_DELETE(self) -> None:
                stand_in.handle(self, "DELETE")

            def do_GET(self) -> None:
                stand_in.handle(self, "GET")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05})
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        if self.thread is not None:
            self.thread.join(5)

    def kinds(self) -> list[tuple[str, str, str]]:
        """(kind, namespace, name) of every stored object."""
        return sorted((k[1], k[2], k[3]) for k in self.objects)

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any]:
        return self.objects[(api_version, kind, namespace, name)]

    def find(self, api_version: str, kind: str, namespace: str) -> list[dict[str, Any]]:
        with self.lock:
            return [o for k, o in self.objects.items() if k[:3] == (api_version, kind, namespace)]

    def put(self, obj: dict[str, Any]) -> None:
        """Store OBJ as a controller would create it (a Job's pod): no validation, no apply rules."""
        meta = obj["metadata"]
        with self.lock:
            meta.setdefault("uid", str(uuid.uuid4()))
            self.objects[(obj["apiVersion"], obj["kind"], meta.get("namespace", ""), meta["name"])] = obj

    def set_status(
        self, api_version: str, kind: str, namespace: str, name: str, status: dict[str, Any]
    ) -> None:
        """What the status subresource's writers (the Job controller, the kubelet) would report."""
        with self.lock:
            key = (api_version, kind, namespace, name)
            if key in self.objects:
                self.objects[key] = {**self.objects[key], "status": status}

    # --- request handling -----------------------------------------------------------------------------------

    def handle(self, h: BaseHTTPRequestHandler, verb: str) -> None:
        parts = urlsplit(h.path)
        with self.lock:
            self.requests.append((verb, parts.path))
            if self.fail_next:
                return self._status(h, self.fail_next.pop(0), "InternalError", "injected failure")
            query = parse_qs(parts.query)
            if verb == "GET" and (m := PODS_PATH.match(parts.path)):
                return self._json(h, 200, self._pods(m["ns"], query.get("labelSelector", [""])[0]))
            if verb == "GET" and (m := LOG_PATH.match(parts.path)):
                return self._log(h, m["ns"], m["name"], query)
            key = self._key(parts.path)
            if key is None:
                return self._status(h, 404, "NotFound", f"the stand-in does not serve {verb} {parts.path}")
            if verb == "GET":
                if key not in self.objects:
                    return self._status(h, 404, "NotFound", f"{key[1]} {key[3]} not found")
                return self._json(h, 200, self.objects[key])
            if verb == "DELETE":
                deleted = self.objects.pop(key, None)
                if deleted is None:
                    return self._status(h, 404, "NotFound", f"{key[1]} {key[3]} not found")
                policy = query.get("propagationPolicy", [None])[0]
                self.deletions.append((key, policy))
                if key[1] == "Namespace":  # the namespace takes everything in it along
                    for k in [k for k in self.objects if k[2] == key[3]]:
                        del self.objects[k]
                if key[:2] == ("batch/v1", "Job") and policy in ("Background", "Foreground"):
                    for pod in self._pods(key[2], f"{JOB_NAME_LABEL}={key[3]}")["items"]:
                        del self.objects[("v1", "Pod", key[2], pod["metadata"]["name"])]
                if key[:2] in RETURN_DELETED:  # as the real server (and the client's declared return types)
                    return self._json(h, 200, deleted)
                return self._status(h, 200, "Success", "deleted")
            return self._apply(h, key, query)

    def _apply(self, h: BaseHTTPRequestHandler, key: Key, query: dict[str, list[str]]) -> None:
        if h.headers.get("content-type", "").split(";")[0] != APPLY:
            return self._status(h, 415, "UnsupportedMediaType", f"expected {APPLY}")
        if not query.get("fieldManager"):
            return self._status(h, 400, "BadRequest", "fieldManager is required for apply patch")
        body = json.loads(h.rfile.read(int(h.headers.get("content-length", 0))))  # JSON is valid YAML
        meta = body.get("metadata", {})
        api_version, kind, namespace, name = key
        if (body.get("apiVersion"), body.get("kind"), meta.get("name")) != (api_version, kind, name) or (
            namespace and meta.get("namespace") != namespace
        ):
            return self._status(
                h, 400, "BadRequest", "the body's apiVersion/kind/name/namespace differ from the path"
            )
        if namespace and ("v1", "Namespace", "", namespace) not in self.objects:
            return self._status(h, 404, "NotFound", f'namespaces "{namespace}" not found')
        try:
            validate(body)
        except Exception as exc:
            return self._status(h, 422, "Invalid", f"{kind} {name} is invalid: {str(exc)[:2000]}")
        stored = self.objects.get(key)
        uid = stored["metadata"]["uid"] if stored else str(uuid.uuid4())
        body["metadata"] = {**meta, "uid": uid, "resourceVersion": str(len(self.requests))}
        self.objects[key] = body
        return self._json(h, 201 if stored is None else 200, body)

    def _pods(self, namespace: str, selector: str) -> dict[str, Any]:
        """A PodList of NAMESPACE's pods matching SELECTOR (equality terms only: ``a=b,c=d``)."""
        wanted = dict(term.split("=", 1) for term in selector.split(",") if term)
        items = [
            o
            for k, o in self.objects.items()
            if k[:3] == ("v1", "Pod", namespace)
            and all((o["metadata"].get("labels") or {}).get(a) == b for a, b in wanted.items())
        ]
        return {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items}

    def _log(self, h: BaseHTTPRequestHandler, namespace: str, name: str, query: dict[str, list[str]]) -> None:
        if ("v1", "Pod", namespace, name) not in self.objects:
            return self._status(h, 404, "NotFound", f'pods "{name}" not found')
        lines = self.logs.get((namespace, name), "").splitlines(keepends=True)
        if "tailLines" in query:
            lines = lines[-int(query["tailLines"][0]) :]
        data = "".join(lines).encode()
        h.send_response(200)
        h.send_header("content-type", "text/plain")
        h.send_header("content-length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _key(self, path: str) -> Key | None:
        if m := NAMESPACE_PATH.match(path):
            return ("v1", "Namespace", "", m["name"])
        m = PATH.match(path)
        if m is None or m["prefix"] not in GROUPS or m["ns"] is None:
            return None
        api_version, plurals = GROUPS[m["prefix"]]
        kind = plurals.get(m["plural"])
        return None if kind is None else (api_version, kind, m["ns"], m["name"])

    @staticmethod
    def _json(h: BaseHTTPRequestHandler, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        h.send_response(code)
        h.send_header("content-type", "application/json")
        h.send_header("content-length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _status(self, h: BaseHTTPRequestHandler, code: int, reason: str, message: str) -> None:
        status = {"kind": "Status", "apiVersion": "v1", "status": "Failure" if code >= 300 else "Success",
                  "reason": reason, "message": message, "code": code}  # fmt: skip
        self._json(h, code, status)
