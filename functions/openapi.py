"""The platform's OpenAPI document: every endpoint it answers, with the errors it really answers.

FastAPI describes the ``/v1`` routes from their signatures; this module completes that document with what
FastAPI cannot see or gets wrong:

- the data plane (Open Inference Protocol v2: ``/v2/...``, ``/t/{tenant}/v2/...`` and, by host name,
  ``{function}.{tenant}.{domain}/v2/models/...``) with the OIP request and response schemas, ``/metrics`` and the
  portal (``/ui``);
- errors as the app answers them (``functions/errors.py``): status 400, never FastAPI's 422, for a request that
  does not validate, and 400/401/403/404/409/413/429/503/504 where a route can answer them, each with the one
  error body ``{"error": "<message>"}``, and ``Retry-After`` or ``WWW-Authenticate`` where sent;
- the bearer key as a security scheme, on the operations that need one.
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from functions.settings import Settings

ERROR_REF = {"$ref": "#/components/schemas/Error"}

ERRORS: dict[int, str] = {
    400: "Bad input; the message says what to change.",
    401: "No API key, or one that is not valid.",
    403: "The key is valid but lacks the scope, is not the admin key, or the tenant's plan forbids it.",
    404: "Not found; also another tenant's things, so that names cannot be probed.",
    409: "Conflicts with the current state (a name taken; a function that failed to deploy).",
    413: "The body (upload, request) is over a size limit, or the tenant's storage is full.",
    429: "Over the tenant's request rate or concurrency limit; retry after Retry-After seconds.",
    503: "The platform cannot serve this now (deploying, queue full, no capacity); retry after Retry-After.",
    504: "The function did not wake, or did not answer, within its time limit.",
    507: "The model ran out of memory on this request (the worker's memory limit).",
}
RETRY_AFTER = {"description": "Seconds to wait before retrying", "schema": {"type": "integer", "minimum": 1}}
WWW_AUTHENTICATE = {"description": 'Bearer realm="paddlefn"', "schema": {"type": "string"}}

# Besides the ones every route gets from its parameters and its key (see _default_errors): what each may answer.
EXTRA_ERRORS: dict[tuple[str, str], set[int]] = {
    ("post", "/v1/tenants"): {409},
    ("post", "/v1/tenants/{tenant}/keys"): {409},  # the plan's max_keys
    ("post", "/v1/tenants/{tenant}/functions"): {409, 413},
    ("patch", "/v1/tenants/{tenant}/functions/{name}"): {409},
    ("post", "/v1/tenants/{tenant}/functions/{name}/edge-bundles"): {409},
    ("post", "/v1/edge/usage"): {413},
}

_TEXT = {"schema": {"type": "string"}}
# Other bodies than JSON that a route's success may answer with (by a query parameter: format=jsonl, csv).
OTHER_CONTENT: dict[tuple[str, str], dict[str, Any]] = {
    ("get", "/v1/audit"): {"application/jsonl": _TEXT},
    ("get", "/v1/tenants/{tenant}/audit"): {"application/jsonl": _TEXT},
    ("get", "/v1/tenants/{tenant}/invoices/{period}"): {"text/csv": _TEXT},
    ("get", "/v1/deleted-tenants/{tenant_id}/invoices/{period}"): {"text/csv": _TEXT},
    ("post", "/v1/tenants/{tenant}/functions/{name}/edge-bundles"): {
        "application/gzip": {"schema": {"type": "string", "format": "binary"}}
    },
}

# Routes that take no key at all (the data plane's are described by hand below).
OPEN_ROUTES = {("post", "/v1/edge/usage")}  # the edge device's own key, checked by the route


def install(app: FastAPI, settings: Settings) -> None:
    """Serve the completed document at /openapi.json (built once, on first request)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document(app, settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def document(app: FastAPI, settings: Settings) -> dict[str, Any]:
    doc = get_openapi(
        title=app.title,
        version=app.version,
        summary=app.summary,
        description=DESCRIPTION,
        routes=app.routes,
    )
    doc["servers"] = [{"url": settings.base_url, "description": "this platform"}]
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    schemas.update(copy.deepcopy(SCHEMAS))
    components["securitySchemes"] = {
        "bearer": {
            "type": "http",
            "scheme": "bearer",
            "description": "An API key: admin, tenant or edge device",
        }
    }
    for path, operations in doc["paths"].items():
        for method, op in operations.items():
            _complete(method, path, op)
    doc["paths"].update(data_plane(settings))
    doc["paths"].update(OTHER_PATHS)
    doc["tags"] = TAGS
    return doc


def _complete(method: str, path: str, op: dict[str, Any]) -> None:
    """Errors as the app answers them, and the key, on one FastAPI-described operation."""
    responses = op.setdefault("responses", {})
    responses.pop("422", None)
    has_input = bool(op.get("parameters")) or "requestBody" in op
    needs_key = (method, path) not in OPEN_ROUTES
    statuses = set(EXTRA_ERRORS.get((method, path), set()))
    if has_input:
        statuses.add(400)
    if (
        "requestBody" in op
    ):  # every body outside the data plane is bounded (functions/bounds.py, max_json_bytes)
        statuses.add(413)
    statuses.add(401)
    if needs_key:
        statuses.add(403)
        op["security"] = [{"bearer": []}]
    if "{" in path:
        statuses.add(404)
    for status in sorted(statuses):
        responses.setdefault(str(status), error_response(status))
    if (method, path) in OTHER_CONTENT:
        success = next(r for s, r in responses.items() if s.startswith("2"))
        success.setdefault("content", {}).update(OTHER_CONTENT[(method, path)])
    op.setdefault("tags", ["control plane"])


def error_response(status: int, description: str | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description or ERRORS[status],
        "content": {"application/json": {"schema": ERROR_REF}},
    }
    if status in (429, 503):
        response["headers"] = {"Retry-After": RETRY_AFTER}
    if status == 401:
        response["headers"] = {"WWW-Authenticate": WWW_AUTHENTICATE}
    return response


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


DESCRIPTION = """Serverless inference for PaddlePaddle models.

The control plane is under `/v1` (JSON, `Authorization: Bearer <key>`). Each function is served by the
Open Inference Protocol v2 at `/t/{tenant}/v2/models/{function}` (an OIP client's base URL is
`/t/{tenant}`), and at `http://{function}.{tenant}.{domain}/v2/models/{function}`.

Every error is `{"error": "<message>"}`; the message says what to change."""

TAGS = [
    {"name": "control plane", "description": "Tenants, keys, plans, functions, usage, invoices, audit, edge"},
    {"name": "inference", "description": "Open Inference Protocol v2 (data plane)"},
    {"name": "platform", "description": "Health, metrics and the portal"},
]

_TENSOR_DATA = {
    "description": "The tensor's elements in row-major order, flat or nested as the shape; absent when the "
    "tensor is sent as binary data (parameters.binary_data_size)",
    "type": "array",
    "items": {},
}
_SHAPE = {"type": "array", "items": {"type": "integer"}, "description": "-1 in metadata: any size"}
_PARAMETERS = {"type": "object", "additionalProperties": True}

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "string", "description": "What went wrong and what to change"}},
    },
    "ServerLive": {"type": "object", "required": ["live"], "properties": {"live": {"type": "boolean"}}},
    "ServerReady": {"type": "object", "required": ["ready"], "properties": {"ready": {"type": "boolean"}}},
    "ModelReady": {
        "type": "object",
        "required": ["name", "ready"],
        "properties": {"name": {"type": "string"}, "ready": {"type": "boolean"}},
    },
    "ServerMetadata": {
        "type": "object",
        "required": ["name", "version", "extensions"],
        "properties": {
            "name": {"type": "string"},
            "version": {"type": "string"},
            "extensions": {"type": "array", "items": {"type": "string"}},
        },
    },
    "MetadataTensor": {
        "type": "object",
        "required": ["name", "datatype", "shape"],
        "properties": {"name": {"type": "string"}, "datatype": {"type": "string"}, "shape": _SHAPE},
    },
    "ModelMetadata": {
        "type": "object",
        "required": ["name", "platform", "inputs", "outputs"],
        "properties": {
            "name": {"type": "string"},
            "versions": {"type": "array", "items": {"type": "string"}},
            "platform": {"type": "string"},
            "inputs": {"type": "array", "items": _ref("MetadataTensor")},
            "outputs": {"type": "array", "items": _ref("MetadataTensor")},
        },
    },
    "RequestInput": {
        "type": "object",
        "required": ["name", "shape", "datatype"],
        "properties": {
            "name": {"type": "string"},
            "shape": _SHAPE,
            "datatype": {
                "type": "string",
                "description": "BOOL, UINT8..UINT64, INT8..INT64, FP16, FP32, FP64 or BYTES",
            },
            "parameters": _PARAMETERS,
            "data": _TENSOR_DATA,
        },
    },
    "RequestOutput": {
        "type": "object",
        "required": ["name"],
        "properties": {"name": {"type": "string"}, "parameters": _PARAMETERS},
    },
    "InferenceRequest": {
        "type": "object",
        "required": ["inputs"],
        "properties": {
            "id": {"type": "string"},
            "parameters": _PARAMETERS,
            "inputs": {"type": "array", "items": _ref("RequestInput")},
            "outputs": {"type": "array", "items": _ref("RequestOutput")},
        },
    },
    "ResponseOutput": {
        "type": "object",
        "required": ["name", "shape", "datatype"],
        "properties": {
            "name": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer"}},
            "datatype": {"type": "string"},
            "parameters": _PARAMETERS,
            "data": _TENSOR_DATA,
        },
    },
    "InferenceResponse": {
        "type": "object",
        "required": ["model_name", "outputs"],
        "properties": {
            "model_name": {"type": "string"},
            "model_version": {"type": "string"},
            "id": {"type": "string"},
            "parameters": _PARAMETERS,
            "outputs": {"type": "array", "items": _ref("ResponseOutput")},
        },
    },
}

_BINARY_BODY = {
    "schema": {
        "type": "string",
        "format": "binary",
        "description": "Binary tensor extension: the JSON request (or response) of Inference-Header-Content-Length "
        "bytes, then each binary tensor's raw bytes in order",
    }
}
_INFER_BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": _ref("InferenceRequest")},
        "application/octet-stream": _BINARY_BODY,
    },
}
_HEADER_LENGTH = {
    "name": "Inference-Header-Content-Length",
    "in": "header",
    "required": False,
    "description": "With a binary body: the length of its JSON part",
    "schema": {"type": "integer", "minimum": 0},
}
_INFER_HEADERS = {
    "x-request-id": {"description": "The request's id (in usage records)", "schema": {"type": "string"}},
    "x-paddlefn-engine": {"description": "The engine that answered", "schema": {"type": "string"}},
    "x-paddlefn-device": {"description": "cpu, gpu or lite", "schema": {"type": "string"}},
    "x-paddlefn-compute-ms": {"description": "Compute time billed", "schema": {"type": "string"}},
    "x-paddlefn-cold-start-ms": {
        "description": "Present when the request woke the function",
        "schema": {"type": "string"},
    },
}


def _param(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "description": description,
            "schema": {"type": "string"}}  # fmt: skip


TENANT = _param("tenant", "The tenant's name")
MODEL = _param("model", "The function's name")
VERSION = _param("version", "The model version (any: a function serves its one current version)")
KEY: list[dict[str, list[str]]] = [{"bearer": []}, {}]  # a key, or none for a public function


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(s): error_response(s) for s in statuses}


def _model_operations(prefix: str, params: list[dict[str, Any]], tag_suffix: str) -> dict[str, Any]:
    """The OIP model endpoints under PREFIX (``.../v2/models/{model}``), with and without /versions/{version}."""
    lookup = _errors(401, 403, 404)
    metadata = {
        "get": {
            "tags": ["inference"],
            "summary": "Model metadata: its input and output tensors",
            "operationId": f"model_metadata{tag_suffix}",
            "security": KEY,
            "responses": {
                "200": _json(_ref("ModelMetadata"), "The model's tensors"),
                **lookup,
                **_errors(409, 503),
            },
        }
    }
    ready = {
        "get": {
            "tags": ["inference"],
            "summary": "Whether the model is ready (a sleeping function is: it wakes on the next request)",
            "operationId": f"model_ready{tag_suffix}",
            "security": KEY,
            "responses": {
                "200": _json(_ref("ModelReady"), "Ready"),
                **lookup,
                "503": _json(_ref("ModelReady"), "Not ready (deploying, or the deploy failed)"),
            },
        }
    }
    infer_responses = {
        "200": {
            "description": "The outputs; application/octet-stream when binary outputs were asked for",
            "headers": _INFER_HEADERS,
            "content": {
                "application/json": {"schema": _ref("InferenceResponse")},
                "application/octet-stream": _BINARY_BODY,
            },
        },
        **_errors(400),
        **lookup,
        **_errors(409, 413, 429, 503, 504, 507),
    }
    infer = {
        "post": {
            "tags": ["inference"],
            "summary": "Run the model on the request's tensors",
            "operationId": f"model_infer{tag_suffix}",
            "security": KEY,
            "parameters": [_HEADER_LENGTH],
            "requestBody": _INFER_BODY,
            "responses": infer_responses,
        }
    }
    versioned = [*params, VERSION]
    paths: dict[str, Any] = {}
    table: list[tuple[str, dict[str, Any], list[dict[str, Any]]]] = [
        (prefix, metadata, params),
        (prefix + "/versions/{version}", metadata, versioned),
        (prefix + "/ready", ready, params),
        (prefix + "/versions/{version}/ready", ready, versioned),
        (prefix + "/infer", infer, params),
        (prefix + "/versions/{version}/infer", infer, versioned),
    ]
    for path, ops, extra in table:
        versioned_id = "_version" if "{version}" in path else ""
        item: dict[str, Any] = {}
        for method, op in ops.items():
            op = copy.deepcopy(op)
            op["operationId"] += versioned_id
            op["parameters"] = [*extra, *op.get("parameters", [])]
            item[method] = op
        paths[path] = item
    return paths


def _health_operations(prefix: str, params: list[dict[str, Any]], suffix: str) -> dict[str, Any]:
    def op(summary: str, operation_id: str, schema: str) -> dict[str, Any]:
        return {
            "get": {
                "tags": ["inference"],
                "summary": summary,
                "operationId": operation_id + suffix,
                "parameters": params,
                "responses": {"200": _json(_ref(schema), summary)},
            }
        }

    return {
        prefix + "/health/live": op("The server is live", "server_live", "ServerLive"),
        prefix + "/health/ready": op("The server is ready", "server_ready", "ServerReady"),
        prefix: op("Server metadata: name, version, extensions", "server_metadata", "ServerMetadata"),
    }


def data_plane(settings: Settings) -> dict[str, Any]:
    paths: dict[str, Any] = {}
    paths.update(_health_operations("/v2", [], ""))
    paths.update(_health_operations("/t/{tenant}/v2", [TENANT], "_of_tenant"))
    paths.update(_model_operations("/t/{tenant}/v2/models/{model}", [TENANT, MODEL], ""))
    # The same model endpoints by host name, as Knative names services: {function}.{tenant}.{domain}.
    by_host = _model_operations("/v2/models/{model}", [MODEL], "_by_host")
    server = {
        "url": "http://{function}.{tenant}." + settings.domain + f":{settings.port}",
        "description": "The function's own host name; {model} in the path must be {function}",
        "variables": {"function": {"default": "function"}, "tenant": {"default": "tenant"}},
    }
    for item in by_host.values():
        item["servers"] = [server]
    paths.update(by_host)
    return paths


OTHER_PATHS: dict[str, Any] = {
    "/metrics": {
        "get": {
            "tags": ["platform"],
            "summary": "Prometheus metrics (admin)",
            "operationId": "metrics",
            "security": [{"bearer": []}],
            "responses": {
                "200": {
                    "description": "Prometheus text exposition format",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                },
                **_errors(401, 403),
            },
        }
    },
    "/ui": {
        "get": {
            "tags": ["platform"],
            "summary": "The portal (redirects to /ui/)",
            "operationId": "portal_redirect",
            "responses": {
                "307": {
                    "description": "To /ui/",
                    "headers": {"location": {"schema": {"type": "string"}}},
                }
            },
        }
    },
    "/ui/": {
        "get": {
            "tags": ["platform"],
            "summary": "The portal: a web page for tenants and the admin",
            "operationId": "portal",
            "responses": {
                "200": {"description": "The portal", "content": {"text/html": {"schema": {"type": "string"}}}}
            },
        }
    },
    "/ui/{file}": {
        "get": {
            "tags": ["platform"],
            "summary": "The portal's static files (scripts, styles)",
            "operationId": "portal_file",
            "parameters": [
                {"name": "file", "in": "path", "required": True, "schema": {"type": "string"}},
            ],
            "responses": {
                "200": {"description": "The file", "content": {"*/*": {"schema": {"type": "string"}}}},
                **_errors(404),
            },
        }
    },
}
